"""Tooling that needs the repository checkout beside the trainer (configs, the classic reference loop);
not installed with the package. Run from a checkout:

python -m tools.gpu_check --out DIR         check a GPU machine and print a throughput table (docs/gpu.md)
tools/bundle_offline.sh                     what a node without internet needs, in .bundle/ (docs/gpu.md)
python tools/compare_quality.py ...         the classic loop against the trainer, by sample quality (docs/results.md)
python tools/calibrate_diversity.py ...     the `diversity` measure on real, noise, trained and collapsed samples
python -m tools.classifier train|calibrate  the offline quality measure's classifier (docs/evaluation.md)
python -m tools.config_docs                 regenerate docs/configuration.md from the schema
python tools/mutation_check.py              break the code on purpose, check the suite notices (docs/reliability.md)
"""
