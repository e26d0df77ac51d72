from pathlib import Path

from setuptools import setup

here = Path(__file__).parent


def requirements(name):
    lines = (here / "requirements" / name).read_text().splitlines()
    return [l.split("#")[0].strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


setup(
    name="atlas-fast",
    version="0.1.0",
    description="A lean GRPO trainer with fused Triton kernels",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # `kernels/` installs as `atlas_kernels`: a top-level `kernels` module would shadow
    # Hugging Face's `kernels` distribution, which transformers probes on import.
    packages=["atlas_fast", "atlas_fast.demo", "atlas_fast.configs", "atlas_kernels"],
    # The Hydra configs ship inside the package so a non-editable install finds them too.
    package_dir={"atlas_kernels": "kernels", "atlas_fast.configs": "configs"},
    package_data={"atlas_fast.demo": ["assets/*", "assets/*/*"], "atlas_fast.configs": ["*.yaml", "*/*.yaml"]},
    include_package_data=True,
    install_requires=requirements("base.txt"),
    extras_require={
        "test": requirements("test.txt"),
        "bench": ["pytest-benchmark==5.3.1", "trl==1.16.0", "liger-kernel==0.8.5"],
    },
    entry_points={"console_scripts": ["atlas-fast=atlas_fast.cli:main"]},
)
