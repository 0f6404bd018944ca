"""What benchmark.py measures, a module per part (models, mixers, layers, epochs), how it measures
(measuring) and what it writes (report); suite runs them. The scripts beside them (layer_versions.py,
profile_step.py, gpu_check.sh) are run by path."""
