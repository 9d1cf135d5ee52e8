"""The text report: one table per group, thread speed-ups, targets, memory."""
from .units import fmt_bytes


def format_memory(rows):
    lines = ["", "memory (child processes; interpreter + numpy + xlegacy alone: "
             f"{fmt_bytes(rows[0]['start_rss']) if rows else '?'}):"]
    for d in rows:
        lines.append(f"  {d['text']:<58} {fmt_bytes(d['stream_bytes'])} stream: peak "
                     f"{fmt_bytes(d['peak_rss'])}"
                     + (f" = image {fmt_bytes(d['image'])} + {fmt_bytes(d['over_image'])}"
                        if d["image"] else "")
                     + f"  {'met' if d['met'] else 'NOT met'}")
    return lines


# ================================================================= report
def _ms(seconds):
    ms = 1e3 * seconds
    return f"{ms:9.1f}" if ms >= 100 else f"{ms:9.3g}"


def _load(load):
    a, b = load if load else (None, None)
    return f"{'?' if a is None else a} -> {'?' if b is None else b}"


def format_group(g):
    base = f"'{g.primary}'"
    if g.primary_of:
        base += " (the fastest here of: " + "; ".join(g.primary_of) + ")"
    lines = [g.title,
             f"  unit: {g.unit}; ratio = GB/s / GB/s of {base}, per round: median, min, "
             f"max; {max((len(c.times) for c in g.cases), default=0)} rounds; load average "
             f"{_load(g.load)}"]
    labels = [c.name + (f" [{c.note}]" if c.note else "") for c in g.cases]
    width = max(len(x) for x in labels)
    lines.append(f"  {'case':<{width}}  {'GB/s':>7}  {'ratio':>6} {'min':>6} {'max':>6}  "
                 f"{'min ms':>9} {'median':>9} {'max ms':>9}")
    for c, label in zip(g.cases, labels):
        st = g.ratio_stats(c.name)
        mark = "*" if c.role == "subject" else " "
        r = "" if st is None else f"{st[1]:6.2f} {st[0]:6.2f} {st[2]:6.2f}"
        lines.append(f"{mark} {label:<{width}}  {c.gbps:7.2f}  {r:>20}  "
                     f"{_ms(min(c.times))} {_ms(c.median)} {_ms(max(c.times))}")
    return lines


def format_target(row):
    """'value (min..max)  need ...  met' for a target row of GroupResult."""
    kind = row["kind"]
    if row["ratio"] is None:
        value = "-"
    elif kind == "seconds":
        value = f"{row['ratio']:.0f} s"
    elif kind == "extra_ms":
        value = f"{row['ratio']:+.0f} ms ({row['min']:+.0f}..{row['max']:+.0f})"
    else:
        value = (f"{'time ' if kind != 'gbps' else ''}{row['ratio']:.2f}x "
                 f"({row['min']:.2f}..{row['max']:.2f})")
    need = {"gbps": f"need >= {row['need']:.2f}x", "time": f"need <= {row['need']:.2f}x",
            "extra_ms": f"need <= +{row['need']:.0f} ms",
            "seconds": f"need <= {row['need']:.0f} s"}.get(kind, "(reported)")
    state = "" if kind == "report" else (
        "n/a" if row["met"] is None else ("met" if row["met"] else "NOT met"))
    return value, need, state


def thread_speedups(results):
    """[(group key, case stem, t(1 thread) / t(2 threads))] for every case
    that a group has in a 1-thread and a 2-thread variant."""
    out = []
    for g in results:
        for c in g.cases:
            if c.name.endswith(", 2 threads"):
                stem = c.name[:-len(", 2 threads")]
                one = g.result(stem + ", 1 thread")
                if one is not None and c.times and one.times:
                    out.append((g.key, stem, one.median / c.median))
    return out


def format_report(results, machine, extras=(), rows=None):
    """The text report; rows: target rows (default: the groups')."""
    m = machine
    lines = [f"xlegacy {m.get('xlegacy')} bench: {m.get('cpu', '?')}, "
             f"{m.get('cpus_usable', m.get('cpus'))} cpus, {m.get('memory', '?')}, "
             f"THP {m.get('transparent_hugepage', '?')}, numpy {m.get('numpy')}, "
             f"backend {m.get('backend')}, {m.get('repeat')} rounds, load average "
             f"{m.get('load_before', '?')} before / {m.get('load_after', '?')} after"]
    for g in results:
        lines.append("")
        lines += format_group(g)
    speedups = thread_speedups(results)
    if speedups:
        lines.append("")
        lines.append("2 threads against 1 (median time of the 1-thread case / the 2-thread "
                     "case);")
        lines.append(f"  control, compute-bound numpy on 2 threads: "
                     f"{m.get('core_check_before', '?')}x before, "
                     f"{m.get('core_check_after', '?')}x after (2.0 = the second core was free)")
        w = max(len(f"{k}: {n}") for k, n, _ in speedups)
        for key, name, x in speedups:
            lines.append(f"  {key + ': ' + name:<{w}}  {x:5.2f}x")
    if rows is None:
        rows = [row for g in results for row in g.target_rows()]
    if rows:
        lines.append("")
        lines.append("targets (median ratios of this run)")
        lines.append("  value: median over rounds (min..max); every round ran the subject "
                     "and its baseline side by side; load: 1-minute load average")
        w = max(len(r["target"]) for r in rows)
        cells = [format_target(r) for r in rows]
        vw = max(len(c[0]) for c in cells)
        nw = max(len(c[1]) for c in cells)
        for row, (value, need, state) in zip(rows, cells):
            lines.append(f"  {row['target']:<{w}}  {value:>{vw}}  {need:<{nw}}  {state:<7}  "
                         f"load {_load(row['load'])}")
    lines += list(extras)
    lines.append("")
    lines.append("* = xlegacy; the other cases are baselines")
    return "\n".join(lines)
