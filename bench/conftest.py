"""pytest-benchmark suite of xlegacy: `pytest bench/ --benchmark-only`.

Every benchmark group is one operation on one input with its baselines
(numpy copies of the same bytes into warm and fresh memory, reading and cp of
the stream file, the reference twin, the best plain-numpy version); the cases
come from xlegacy.bench, the engine behind `xlegacy bench`, so both measure
the same things.  pytest-benchmark runs each case's rounds back to back; the
`xlegacy bench` command interleaves them, which is fairer on a busy machine.

At the end a summary prints, per group, GB/s (on the group's unit, from the
median) and the ratio to the group's primary baseline, then the performance
targets.  Sizes and options: see datasets.py.
"""
import pytest

from datasets import ROUNDS, BenchData

from xlegacy import bench as B

_session = {}


@pytest.fixture(scope="session")
def bench_data():
    data = BenchData()
    _session["data"] = data
    yield data
    data.close()


def run_case(benchmark, data, key, name, rounds=ROUNDS):
    """Benchmark case `name` of group `key` with pytest-benchmark."""
    group = data.group(key)
    if group is None:
        pytest.skip(f"group {key} is not available here")
    case = group.case(name)
    benchmark.group = f"{key}: {group.title}"
    benchmark.extra_info.update({"key": key, "case": name, "bytes": case.nbytes,
                                 "role": case.role, "unit": group.unit,
                                 "primary": name in _names(group.primary), "note": case.note})
    benchmark.pedantic(case.fn, setup=case.setup, teardown=case.cleanup, rounds=rounds,
                       warmup_rounds=1, iterations=1)


def _names(primary):
    """A group's primary baseline: one name, or a tuple (the fastest of them)."""
    return (primary,) if isinstance(primary, str) else tuple(primary)


def _collect(config):
    bs = getattr(config, "_benchmarksession", None)
    if bs is None:
        return {}
    groups = {}
    for b in bs.benchmarks:
        info = b.extra_info
        if "key" not in info or not b.stats or not b.stats.rounds:
            continue
        times = list(b.stats.data)
        groups.setdefault(info["key"], []).append(
            (B.CaseResult(info["case"], info["role"], info["bytes"], times, info.get("note", "")),
             info["primary"], info["unit"]))
    return groups


@pytest.hookimpl(trylast=True)
def pytest_terminal_summary(terminalreporter, config):
    groups = _collect(config)
    if not groups:
        return
    data = _session.get("data")
    tr = terminalreporter
    tr.section("xlegacy: GB/s and ratio to each group's primary baseline (medians)")
    results = []
    for key, rows in groups.items():
        # A tuple of names: the fastest of them, as in `xlegacy bench`.
        primary = tuple(c.name for c, p, _ in rows if p) or rows[0][0].name
        targets = data.targets.get(key, []) if data else []
        title = data.titles.get(key, key) if data else key
        unit = rows[0][2]
        g = B.GroupResult(key, title, unit, primary, [c for c, _, _ in rows], targets, {})
        results.append(g)
        for line in B.format_group(g):
            tr.write_line(line)
        tr.write_line("")
    target_rows = [r for g in results for r in g.target_rows()]
    if target_rows:
        tr.write_line("targets (medians; pytest-benchmark runs cases one after the other):")
        for r in target_rows:
            value, need, state = B.format_target(r)
            tr.write_line(f"  {r['target']:<62} {value:>22}  {need}  {state}")
    if data and data.memory:
        for line in B.format_memory(data.memory):
            tr.write_line(line)
