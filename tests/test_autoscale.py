"""The autoscale formula language (hpcbatch.autoscale), pure and fast: the tokenizer and
parser (statements, line continuation, comments, literals, precedence), the evaluator
(types, functions, sampled variables and their methods over windows), and every bad
formula as one line naming line:col.

Cases:
* Azure-style formulas evaluate to the target and option they should
* precedence and associativity, ternaries nested right, && || short-circuit
* time literals and TimeInterval_* constants; interval arithmetic and its type errors
* GetSample by count, by window (start, end), with a percent; GetSamplePercent, Count
* $PendingTaskSlots is what the formula sees (slot-aware counts come from the sampler)
* a bare sampled variable is its latest sample; $TargetNodes reads the current target
* the dry run's variables list every service variable, every $var and local name
* bad formulas: syntax, unknown variable/name/function/method, division by zero, wrong
  types, no $TargetNodes, negative target, bad option, assigning a service variable,
  nesting and size limits: each a FormulaError 'formula: line L:C: ...', one line
* the deallocation option names and aliases; --interval parsing
"""

from __future__ import annotations

import pytest

from hpcbatch import autoscale as A
from hpcbatch.autoscaling import Metrics, parse_interval, samples_of, task_slots

NOW = 1000.0


def series(name: str, values, period: float = 1.0, now: float = NOW) -> A.Samples:
    n = len(values)
    return A.Samples(name, tuple((now - (n - 1 - i) * period, float(v))
                                 for i, v in enumerate(values)), period)


def run(formula: str, target: int = 0, **metrics):
    samples = {name: series(name, vals) for name, vals in metrics.items()}
    for name in A.METRICS:
        samples.setdefault(name, series(name, [0]))
    return A.evaluate(formula, samples, now=NOW, target_nodes=target)


def error(formula: str, **metrics) -> A.FormulaError:
    with pytest.raises(A.FormulaError) as info:
        run(formula, **metrics)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith("formula: line "), msg
    return info.value


# ---- formulas users write --------------------------------------------------------

def test_an_azure_style_formula_scales_on_pending_slots():
    f = """
    // at most 3 nodes of 4 slots each
    $samples = $PendingTaskSlots.GetSamplePercent(TimeInterval_Second * 4);
    $now = $PendingTaskSlots.GetSample(1);
    $slots = $samples < 70 ? max(0, $now)
           : max($now, avg($PendingTaskSlots.GetSample(4s)));
    $TargetNodes = min(3, ceil(max($slots) / 4));
    $NodeDeallocationOption = taskcompletion;
    """
    r = run(f, PendingTaskSlots=[0, 4, 8, 40, 9])
    assert (r.target_nodes, r.deallocation) == (3, "taskcompletion")
    assert r.variables["$samples"] == "100" and r.variables["$now"] == "9"
    assert r.variables["$slots"] == "15.25"  # the 4 s average beats the last sample
    r = run(f, PendingTaskSlots=[4])  # one sample of four seconds: 25%
    assert r.target_nodes == 1 and r.variables["$samples"] == "25"


def test_scale_to_zero_when_idle_and_to_the_pending_tasks_otherwise():
    f = ("$busy = $PendingTasks.GetSample(1) > 0 || $TimeSinceLastTask < 5s\n"
         "$TargetNodes = $busy ? min(3, max(1, $PendingTasks / 10)) : 0")
    assert run(f, PendingTasks=[50]).target_nodes == 3
    assert run(f, PendingTasks=[5]).target_nodes == 1
    assert run(f, PendingTasks=[0], TimeSinceLastTask=[2]).target_nodes == 1
    assert run(f, PendingTasks=[0], TimeSinceLastTask=[9]).target_nodes == 0


def test_target_rounds_up_and_reads_the_current_target_before_it_is_set():
    assert run("$TargetNodes = 2.2").target_nodes == 3
    assert run("$TargetNodes = 2.0000000001").target_nodes == 2  # float noise
    assert run("$TargetNodes = $TargetNodes + 1", target=4).target_nodes == 5
    assert run("$TargetDedicatedNodes = $CurrentDedicatedNodes",
               CurrentNodes=[7]).target_nodes == 7  # Batch's names


def test_statements_split_on_semicolons_and_lines_and_lines_go_on_after_operators():
    f = "a = 1; b = 2\nc = a +\n  b\nd = (a\n + c)\n$TargetNodes = d\n   ? d * 2\n   : 0"
    r = run(f)
    assert r.target_nodes == 8 and (r.variables["c"], r.variables["d"]) == ("3", "4")
    assert run("/* a\nblock */ $TargetNodes = 1 // trailing\n;;\n").target_nodes == 1


@pytest.mark.parametrize("expr, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("10 - 4 - 3", 3), ("2 * 3 % 4", 2),
    ("-2 * -3", 6), ("!0 + !5", 1), ("1 < 2 == 1", 1), ("3 > 2 > 1", 0),
    ("1 || 1 / 0", 1), ("0 && 1 / 0", 0), ("1 ? 2 : 3", 2), ("0 ? 2 : 1 ? 4 : 5", 4),
    ("1 == 1 && 2 != 3", 1), (".5 * 4", 2), ("1e1", 10), ("7 % 4", 3),
    ("max(1, 5, 2) - min(4, 3)", 2), ("sum(1, 2, 3) / len(1, 2, 3)", 2), ("avg(2, 4)", 3),
    ("abs(-4)", 4), ("floor(2.7) + ceil(2.1) + round(2.5)", 8), ("std(2, 4) * 1", 1),
    ("percentile($PendingTasks.GetSample(5), 50)", 3),
    ("60s / 1s", 60), ("5m / TimeInterval_Minute", 5), ("(1h + 30m) / 1m", 90),
    ("2 * 30s == 1m", 1), ("500ms * 4 < 3s", 1), ("\"requeue\" == requeue", 1),
])
def test_operators_functions_and_literals(expr, value):
    r = run(f"$TargetNodes = {expr}", PendingTasks=[1, 2, 3, 4, 5])
    assert r.target_nodes == value, (expr, r.variables)


# ---- sampled variables -----------------------------------------------------------

def test_get_sample_by_count_window_and_percent():
    vals = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]  # one a second, the newest at NOW
    f = ("a = $PendingTasks.GetSample(1)\nb = $PendingTasks.GetSample(3)\n"
         "c = $PendingTasks.GetSample(4s)\nd = $PendingTasks.GetSample(5s, 2s)\n"
         "e = $PendingTasks.GetSamplePercent(20s)\nf = $PendingTasks.Count()\n"
         "g = $PendingTasks.GetSamplePeriod()\nh = $PendingTasks.GetSample(60s, 10)\n"
         "$TargetNodes = sum(c)")
    r = run(f, PendingTasks=vals)
    v = r.variables
    # a window of 4 s holds the samples of the last 4 s: (now - 4 s, now]
    assert v["a"] == "10" and v["b"] == "[8, 9, 10] (3 values)"
    assert v["c"] == "[7, 8, 9, 10] (4 values)" and v["d"] == "[6, 7, 8] (3 values)"
    assert (v["e"], v["f"], v["g"]) == ("50", "10", "1s")
    assert r.target_nodes == 34
    e = error("$TargetNodes = max($PendingTasks.GetSample(60s, 70))", PendingTasks=vals)
    assert "17% of the samples of that window are there, 70% asked" in str(e)
    assert e.stage == "evaluation"


def test_a_bare_sampled_variable_is_its_latest_sample():
    r = run("$TargetNodes = $PendingTasks + $IdleNodes; t = $TimeSinceLastTask",
            PendingTasks=[9, 4], IdleNodes=[1], TimeSinceLastTask=[120])
    assert r.target_nodes == 5 and r.variables["t"] == "2m"
    assert r.variables["$PendingTasks"] == "4 (2 samples)"


def test_the_dry_run_lists_every_variable():
    r = run("x = 1; $y = x + 1; $TargetNodes = $y")
    names = list(r.variables)
    assert {"$" + m for m in A.METRICS} <= set(names)
    assert {"$TargetNodes", "$NodeDeallocationOption", "$y", "x"} <= set(names)
    assert r.variables["$NodeDeallocationOption"] == "requeue"  # Batch's default


def test_samples_come_from_the_metrics_ring_and_count_slots():
    class Row:
        def __init__(self, instances=0, spi=0, required=1):
            self.instances, self.slots_per_instance, self.required_slots = instances, spi, required
    assert task_slots(Row(required=2), 4) == 2
    assert task_slots(Row(instances=3, spi=2), 4) == 6
    assert task_slots(Row(instances=3), 4) == 12  # 0 per instance: whole nodes
    points = [(NOW - 1, Metrics(active=5, running=1, active_slots=10, running_slots=2)),
              (NOW, Metrics(active=6, running=2, active_slots=12, running_slots=4, nodes=1))]
    s = samples_of(points, 1.0)
    assert s["PendingTasks"].points == ((NOW - 1, 6.0), (NOW, 8.0))
    assert s["PendingTaskSlots"].latest() == 16.0 and s["CurrentNodes"].latest() == 1.0
    r = A.evaluate("$TargetNodes = $PendingTaskSlots / 4", s, now=NOW)
    assert r.target_nodes == 4


# ---- errors, each one line naming line:col -----------------------------------------

@pytest.mark.parametrize("formula, where, words", [
    ("$TargetNodes = 1 +", "1:19", "expected a value, found the end of the formula"),
    ("$TargetNodes = (1 + 2", "1:22", "expected ')' closing the '(' at line 1:16"),
    ("x = 1\n$TargetNodes = 2 3", "2:18", "expected ';' or a new line"),
    ("$TargetNodes = 1 @ 2", "1:18", "unexpected character '@'"),
    ("$TargetNodes = 5q", "1:16", "'q' is not a time unit"),
    ("$TargetNodes = \"abc", "1:16", "never closed"),
    ("/* open", "1:1", "never closed with */"),
    ("$ = 3", "1:1", "'$' must begin a variable name"),
    ("$TargetNodes = 1 ? 2", "1:21", "expected ':' of the '?' at line 1:18"),
    ("$TargetNodes = foo(1)", "1:16", "unknown function foo()"),
    ("$TargetNodes = $PendingTasks.(1)", "1:30", "expected a method name"),
    ("$PendingTasks = 3", "1:1", "is a service variable (read only)"),
    ("max = 3", "1:1", "max is a built-in name"),
    ("$TargetNodes =", "1:15", "expected a value after '='"),
    ("", "1:1", "the formula is empty"),
])
def test_syntax_errors_name_line_and_column(formula, where, words):
    e = error(formula)
    assert f"line {where}:" in str(e) and words in str(e), str(e)
    assert e.stage == "syntax"
    with pytest.raises(A.FormulaError):
        A.check(formula)  # refused before it is stored


@pytest.mark.parametrize("formula, where, words", [
    ("$TargetNodes = $PendingTask", "1:16", "unknown variable $PendingTask (did you mean "
     "$PendingTasks?)"),
    ("x = 1\n$TargetNodes = y", "2:16", "unknown name y"),
    ("$TargetNodes = 4 / ($IdleNodes - $IdleNodes)", "1:18", "division by zero"),
    ("$TargetNodes = 4 % 0", "1:18", "division by zero"),
    ("$TargetNodes = $TimeSinceLastTask > 60", "1:35", "cannot compare a time interval "
     "with a number (write a time such as 120s"),
    ("$TargetNodes = 1s + 1", "1:19", "'+' cannot combine a time interval and a number"),
    ("$TargetNodes = $PendingTasks.GetSample(3) + 1", "1:43", "take avg(), max()"),
    ("$TargetNodes = \"x\"", "1:14", "$TargetNodes must be a number, not a string"),
    ("$TargetNodes = 0 - 2", "1:14", "$TargetNodes is -2"),
    ("$TargetNodes = 1; $NodeDeallocationOption = \"later\"", "1:43",
     "$NodeDeallocationOption is 'later'"),
    ("x = 3", "1:1", "never sets $TargetNodes"),
    ("$TargetNodes = $PendingTasks.GetSampel(1)", "1:30", "unknown method .GetSampel() "
     "of $PendingTasks (did you mean GetSample?)"),
    ("$TargetNodes = $PendingTasks.GetSample(0)", "1:30", "a whole number >= 1"),
    ("$TargetNodes = max($PendingTasks.GetSample(1s, 5s))", "1:34", "give the older time"),
    ("$TargetNodes = avg($PendingTasks.GetSample(100s, 50s))", "1:34", "no samples in that "
     "window"),
    ("$TargetNodes = 3; x = (3).GetSample(1)", "1:27", "a method of sampled variables"),
    ("$TargetNodes = percentile(1, 2, 3)", "1:16", "percentile() takes a list"),
    ("$TargetNodes = ceil(1, 2)", "1:16", "ceil() takes one argument"),
    ("$TargetNodes = min(\"a\")", "1:16", "min() takes numbers"),
    ("$TargetNodes = !\"a\"", "1:16", "'!' takes a number"),
    ("$TargetNodes = 1e308 * 10", "1:22", "too large"),
])
def test_evaluation_errors_name_line_and_column(formula, where, words):
    e = error(formula, PendingTasks=[1, 2, 3], IdleNodes=[2])
    assert f"line {where}:" in str(e) and words in str(e), str(e)


def test_check_finds_unknown_names_before_any_sample():
    with pytest.raises(A.FormulaError, match=r"line 1:20: unknown variable \$Pendng"):
        A.check("$TargetNodes = 1 + $Pendng")
    with pytest.raises(A.FormulaError, match="line 1:5: unknown name y"):
        A.check("x = y; $TargetNodes = 1")
    A.check("$x = 1; $TargetNodes = $x + $PendingTasks")  # fine


def test_limits():
    with pytest.raises(A.FormulaError, match="nests more than"):
        A.parse("$TargetNodes = " + "(" * 100 + "1" + ")" * 100)
    with pytest.raises(A.FormulaError, match="nests more than"):
        A.parse("$TargetNodes = " + "-" * 100 + "1")
    with pytest.raises(A.FormulaError, match="too deep"):  # a chain nests as deep
        A.parse("$TargetNodes = " + "+".join(["1"] * 2000))
    assert run("$TargetNodes = " + "+".join(["1"] * 100)).target_nodes == 100
    with pytest.raises(A.FormulaError, match="characters; at most 8192"):
        A.parse("$TargetNodes = 1 " + " " * 9000)
    with pytest.raises(A.FormulaError, match="more than 100 statements"):
        A.parse("x = 1;" * 101 + "$TargetNodes = 1")


def test_no_python_evaluation_of_user_text():
    # what eval() would run is, here, only an unknown name or a syntax error
    for text in ("__import__('os').system('true')", "$TargetNodes = (lambda: 1)()",
                 "$TargetNodes = [1][0]"):
        with pytest.raises(A.FormulaError):
            run(text)


# ---- options and intervals --------------------------------------------------------

def test_deallocation_names_and_intervals():
    assert [A.normalize_option(v) for v in ("requeue", "Terminate", "task_completion",
                                             "taskcompletion", "retained_data",
                                             "retaineddata")] == [
        "requeue", "terminate", "taskcompletion", "taskcompletion", "retaineddata",
        "retaineddata"]
    with pytest.raises(A.ValidationError, match="'soon' is not one of requeue"):
        A.normalize_option("soon")
    assert [parse_interval(v) for v in ("30s", "5m", "1h", "1.5s", 2, None)] == [
        30, 300, 3600, 1.5, 2, 30]
    for bad in ("0.5s", "fast", "-1s", "8d", True):
        with pytest.raises(A.ValidationError, match="interval"):
            parse_interval(bad)


def test_random_text_is_a_formula_error_or_a_result_never_a_crash():
    import random
    rng = random.Random(12)
    pieces = ["$TargetNodes", "=", "$PendingTasks", ".GetSample(", "GetSamplePercent(",
              "(", ")", "1", "0", "-", "+", "*", "/", "%", "?", ":", "&&", "||", "!", ",",
              ";", "\n", "60s", "min(", "avg(", "x", "x =", "\"requeue\"", "1e308", ".5",
              "TimeInterval_Minute", "$NodeDeallocationOption", "==", "<", "//", "/*"]
    outcomes = set()
    for _ in range(3000):
        text = " ".join(rng.choice(pieces) for _ in range(rng.randint(1, 14)))
        if rng.random() < 0.5:
            text = f"{text}\n$TargetNodes = 1"
        try:
            run(text, PendingTasks=[1, 2, 3])
            outcomes.add("ok")
        except A.FormulaError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("formula: line "), text
            outcomes.add(exc.stage)
    assert outcomes == {"ok", "syntax", "evaluation"}
