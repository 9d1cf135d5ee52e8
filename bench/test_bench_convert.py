"""Conversion to a v3 stream (of the HVM stream and of the compressed Remus
stream) beside cp and reading the stream; skipped while xlegacy.converter does
not provide convert(source, output)."""
import pytest
from conftest import run_case
from datasets import CONVERT_KEYS, case_names

convert = pytest.importorskip("xlegacy.converter", reason="xlegacy.converter is not there yet")
if not hasattr(convert, "convert"):
    pytest.skip("xlegacy.converter has no convert(source, output)", allow_module_level=True)


@pytest.mark.parametrize("key,name", case_names(CONVERT_KEYS))
def test_convert(benchmark, bench_data, key, name):
    run_case(benchmark, bench_data, key, name)
