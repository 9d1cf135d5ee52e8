"""Kernel groups: PFN decoding (32/64-bit entries), page scatter by PFN
(sequential and shuffled pfns), and the Remus delta decoder on six data sets,
each case beside its baselines (see conftest.py)."""
import pytest
from conftest import run_case
from datasets import KERNEL_KEYS, case_names


@pytest.mark.parametrize("key,name", case_names(KERNEL_KEYS))
def test_kernel(benchmark, bench_data, key, name):
    run_case(benchmark, bench_data, key, name)
