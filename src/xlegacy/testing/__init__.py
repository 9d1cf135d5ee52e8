"""The fixture side (as numpy.testing): a legacy-stream writer and Xen's
Remus page compressor, used by the tests, the benchmarks and the demo."""
