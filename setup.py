"""lvmae_fast: packed-sequence LV-MAE (long-video masked-embedding autoencoders).

kernels/ and export/ sit at the repository top level (product layout) but install *inside* the package
as lvmae_fast.kernels and lvmae_fast.export, so no generic top-level `kernels`/`export` module lands in
site-packages.
"""
from setuptools import find_packages, setup

# torch 2.6: torch.nn.utils.get_total_norm (the gradient norm every step logs); 2.11 and 2.13 are the tested ones.
CORE = ["torch>=2.6", "numpy>=1.24", "safetensors>=0.4", "pyyaml>=6", "tqdm>=4.60", "matplotlib>=3.7",
        "tensorboard>=2.12"]
EXTRAS = {
    "triton": ["triton>=3.0"],
    "video": ["av>=17"],
    "dali": ["nvidia-dali-cuda130>=2.0"],
    "flash": ["flash-attn>=2.6"],
    # FlashAttention-4 (CuTe DSL, kernels compiled at first use): wheels only; the pre-release pin admits its betas.
    "fa4": ["flash-attn-4[cu13]>=4.0.0b7"],
    "distributed": ["deepspeed>=0.15"],
    "export": ["onnx>=1.16", "onnxscript>=0.1", "onnxruntime>=1.18"],
    "export-gpu": ["onnx>=1.16", "onnxscript>=0.1", "onnxruntime-gpu>=1.18"],
    "tensorrt": ["tensorrt>=10"],
    "encoders": ["transformers>=4.40"],
}
# CI exercises every CPU path for real: Triton interpreter, PyAV, DALI's CPU pipeline (VP9), transformers encoders.
EXTRAS["test"] = ["pytest>=7", "triton>=3.0", "av>=17", "transformers>=4.40", "nvidia-dali-cuda130>=2.0"]

setup(
    name="lvmae_fast",
    version="0.1.0",
    description="Packed-sequence LV-MAE: long-video masked-embedding autoencoders, fast",
    python_requires=">=3.10",
    packages=find_packages(include=["lvmae_fast", "lvmae_fast.*"]) + ["lvmae_fast.kernels", "lvmae_fast.export"],
    package_dir={"lvmae_fast": "lvmae_fast", "lvmae_fast.kernels": "kernels", "lvmae_fast.export": "export"},
    package_data={"lvmae_fast": ["configs/*.yaml"]},
    install_requires=CORE,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["lvmae = lvmae_fast.cli:main"]},
)
