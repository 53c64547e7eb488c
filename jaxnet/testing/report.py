"""Plain-text reports: one table row per candidate, then each failure's counterexample."""
from __future__ import annotations

COLUMNS = ("forward", "jit", "vmap", "grad_x", "grad_w", "grad_b")


def _cell(result) -> str:
    if result is None:
        return "-"
    return f"ok {result.examples}" if result.status == "ok" else result.status


def format_table(rows) -> str:
    """``rows``: ``(label, Report, BadInputsReport or None)`` triples; returns an aligned table.

    A cell is "ok N" (passed on N examples), "FAIL" (out of tolerance: see the counterexample
    below the table, unless the run stopped at another check's) or "-" (not run). "worst" is
    the largest |err|/tol seen on any example: under 1, how close a passing candidate came to
    its tolerance; over 1, how far a failing one is out ("inf": it raised, crashed, hung or gave
    a non-finite or misshapen result).
    """
    extra_cols = sorted({c for _, rep, _ in rows if rep for c in rep.results if c not in COLUMNS})
    cols = list(COLUMNS) + extra_cols
    header = ["backend"] + cols + ["bad_inputs", "worst", "examples", "time"]
    table = [header]
    for label, rep, bad in rows:
        cells = [label]
        cells += [_cell(rep.results.get(c)) if rep else "-" for c in cols]
        if bad is None:
            cells.append("-")
        else:
            cells.append(f"{bad.passed}/{len(bad.results)}" + ("" if bad.ok else " FAIL"))
        worst = max((r.worst_ratio for r in rep.results.values()), default=0.0) if rep else 0.0
        cells += [f"{worst:.3g}" if rep else "-", str(rep.examples) if rep else "-",
                  f"{(rep.seconds if rep else 0) + (bad.seconds if bad else 0):.1f}s"]
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(wd) for c, wd in zip(r, widths)).rstrip() for r in table)


def format_report(report) -> str:
    """A harness ``Report`` as text: a summary line, then every failure's counterexample."""
    status = "matches" if report.ok else "does NOT match"
    lines = [f"{report.candidate} {status} {report.reference} "
             f"({report.examples} examples, {report.seconds:.1f}s)"]
    for r in report.results.values():
        if r.failure is not None:
            continue
        if r.status == "FAIL":  # out of tolerance on an example whose counterexample went to another check
            lines.append(f"  {r.name}: FAIL on some examples too (worst |err|/tol {r.worst_ratio:.3g}); "
                         "keep_going=True finds its own counterexample")
        else:
            lines.append(f"  {r.name}: " + (f"ok on {r.examples} examples (worst |err|/tol {r.worst_ratio:.3g})"
                                             if r.examples else "not run"))
    for f in report.failures:
        lines.append("")
        lines.append("FAIL " + f.format())
    lines += [f"note: {n}" for n in report.notes]
    return "\n".join(lines)
