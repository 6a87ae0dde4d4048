"""Rewrite the expected annotations in promtool rule tests from what the rules render now.

promtool compares annotations exactly, so after editing a summary or description in
config/alerts.yaml run

    python tests/alerts/refresh_annotations.py tests/alerts/*.test.yaml

and review the diff: only annotation text may change. Every `exp_annotations:` block (or a
placeholder `exp_annotations: FILL`) is replaced with the annotations promtool got for that
alert, eval time and instance. Labels, times and series are left alone; an alert that no longer
fires where a test expects it makes this script stop with the test's name.
"""

import json
import os
import re
import subprocess
import sys

ANNOTATIONS = re.compile(r"^(?P<indent> *)exp_annotations:(?: FILL)?\n(?:(?P=indent)  \w+: .*\n)*", re.M)
STRING = r'(\w+)=("(?:[^"\\]|\\.)*")'


def minutes(text):
    return sum(int(n) * {"d": 1440, "h": 60, "m": 1}[u] for n, u in re.findall(r"(\d+)([dhm])", text))


def rendered(path, text):
    """{(alertname, minutes, instance): {annotation: text}} promtool got, annotations left empty."""
    probe = os.path.join(os.path.dirname(path), ".refresh." + os.path.basename(path))
    with open(probe, "w") as f:
        f.write(ANNOTATIONS.sub(lambda m: m.group("indent") + "exp_annotations: {}\n", text))
    try:
        result = subprocess.run(["promtool", "test", "rules", probe], capture_output=True, text=True)
    finally:
        os.remove(probe)
    out = result.stdout + result.stderr
    got = {}
    for block in re.finditer(r"alertname: (\w+), time: ([\dhmd]+), \n.*?got:\[(.*?)\n {12}\]", out, re.S):
        name, when, body = block.groups()
        for m in re.finditer(r"Labels:\{(.*?)\}\n\s*Annotations:\{(.*?)\},?(?:\n|$)", body, re.S):
            labels = dict(re.findall(STRING, m.group(1)))
            got[(name, minutes(when), json.loads(labels.get("instance", '""')))] = {
                k: json.loads(v) for k, v in re.findall(STRING, m.group(2))}
    return got


def refresh(path):
    text = open(path).read()
    got = rendered(path, text)
    lines, out = text.split("\n"), []
    when = name = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if m := re.match(r"\s*- eval_time: (\S+)", line):
            when = m.group(1)
        if m := re.match(r"\s*alertname: (\S+)", line):
            name = m.group(1)
        if m := re.match(r"^( *)exp_annotations:", line):
            indent = m.group(1)
            instance = re.search(r'instance: "([^"]*)"', lines[i - 1])
            key = (name, minutes(when), instance.group(1) if instance else "")
            if key not in got:
                sys.exit(f"{path}: {key} did not render (does the alert still fire there?)")
            out.append(indent + "exp_annotations:")
            for k in sorted(got[key], reverse=True):  # summary before description
                out.append(f"{indent}  {k}: {json.dumps(got[key][k])}")
            i += 1
            while i < len(lines) and re.match(rf"^{indent}  \w+: ", lines[i]):
                i += 1
            continue
        out.append(line)
        i += 1
    with open(path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    for p in sys.argv[1:]:
        refresh(p)
