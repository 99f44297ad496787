"""Tools that need the repository checkout beside the trainer (configs, the classic reference loop).

python -m tools.gpu_check --out DIR         check a GPU machine and print a throughput table (docs/gpu.md)
tools/bundle_offline.sh                     what a node without internet needs, in .bundle/ (docs/gpu.md)
python tools/compare_quality.py ...         the classic loop against the trainer, by sample quality (docs/results.md)
python tools/calibrate_diversity.py ...     the `diversity` measure on real, noise, trained and collapsed samples
"""
