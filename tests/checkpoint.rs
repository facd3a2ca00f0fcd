//! Checkpoints round-trip through the Hugging Face format: saved atomically, reloaded equal (f32
//! exactly, bf16 to rounding), config and tokenizer files carried over, a failed save leaves the
//! previous checkpoint intact.

mod common;

use sppo::backend::{cpu::CpuBackend, Backend};
use sppo::model::weights::SaveDtype;
use sppo::model::Llama;

#[test]
fn save_and_reload() {
    let b = CpuBackend::new(Some(2)).unwrap();
    for case in ["llama_mqa_tied", "llama_v5_layout_sharded", "mistral_sliding_f16"] {
        let src = common::repo_root().join(format!("tests/fixtures/hf/{case}/model"));
        let m = Llama::load(&b, &src).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("ckpt");
        m.save_pretrained(&b, &out, Some(&src), SaveDtype::F32).unwrap();
        let back = Llama::load(&b, &out).unwrap();
        assert_eq!(back.cfg, Llama::load(&b, &src).unwrap().cfg.clone().with_dtype("float32"), "{case}: config changed");
        assert_eq!(b.download(&back.params).unwrap(), b.download(&m.params).unwrap(), "{case}: f32 weights changed");
        assert!(out.join("generation_config.json").exists());
        // bf16: every weight rounded to nearest bf16.
        m.save_pretrained(&b, &out, Some(&src), SaveDtype::Bf16).unwrap();
        let back = Llama::load(&b, &out).unwrap();
        for (x, y) in b.download(&back.params).unwrap().iter().zip(b.download(&m.params).unwrap()) {
            assert_eq!(*x, half::bf16::from_f32(y).to_f32());
        }
        let text = std::fs::read_to_string(out.join("config.json")).unwrap();
        assert!(text.contains("bfloat16"), "{case}: dtype not updated in config.json");
        // No temporary directories left beside it.
        let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("ckpt")]);
    }
}

#[test]
fn failed_save_keeps_the_previous_checkpoint() {
    let b = CpuBackend::new(Some(1)).unwrap();
    let src = common::repo_root().join("tests/fixtures/hf/llama_gqa/model");
    let m = Llama::load(&b, &src).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ckpt");
    m.save_pretrained(&b, &out, Some(&src), SaveDtype::F32).unwrap();
    let before = std::fs::read(out.join("model.safetensors")).unwrap();
    // A source directory whose config.json is malformed makes the save fail midway.
    let bad_src = tmp.path().join("bad");
    std::fs::create_dir(&bad_src).unwrap();
    std::fs::write(bad_src.join("config.json"), "{ not json").unwrap();
    assert!(m.save_pretrained(&b, &out, Some(&bad_src), SaveDtype::Bf16).is_err());
    assert_eq!(std::fs::read(out.join("model.safetensors")).unwrap(), before, "the previous checkpoint was damaged");
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "temporary directory left behind: {names:?}");
}
