"""The GPU check: ``python -m benchmarks.gpu_check`` (see ``__main__``); its CPU mode runs in the test suite."""
