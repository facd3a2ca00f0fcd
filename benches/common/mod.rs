//! What the CPU benches share.

/// The SmolLM2-135M-Instruct architecture (random weights in the benches).
pub const SMOLLM2: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":49152,"hidden_size":576,
 "intermediate_size":1536,"num_hidden_layers":30,"num_attention_heads":9,"num_key_value_heads":3,
 "rms_norm_eps":1e-5,"rope_theta":100000,"max_position_embeddings":8192,"tie_word_embeddings":true}"#;
