"""npid_kernels benchmarks (pytest-benchmark). A package only so that its conftest.py and
helpers get unique module names (benchmarks.conftest) beside tests/conftest.py; not shipped
(setup.py packages only npid_kernels*). See README.md."""
