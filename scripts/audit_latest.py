"""The part of a dependency audit that works where only PyPI's project pages are reachable.

pip-audit (scripts/audit.sh) needs OSV or PyPI's per-version pages; some machines reach neither.
PyPI's project page (/pypi/NAME/json) still lists the known vulnerabilities of the *latest*
release. So: for each pin of requirements.lock, fetch that page; a pin at the latest release is
checked against its list, an older pin is reported as unchecked (not as clean). Vulnerabilities
explained in docs/security.md ("Known vulnerabilities accepted") are shown but do not fail.

    python scripts/audit_latest.py [--lock requirements.lock] [--index https://pypi.org/pypi]

Exit status 1 when a checked pin has an unexplained vulnerability, else 0.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import sys
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def pins(lock: Path) -> list[tuple[str, str]]:
    out = []
    for line in lock.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            out.append((name.strip(), version.strip()))
    return out


def accepted_ids() -> set[str]:
    """IDs in the accepted-vulnerabilities table of docs/security.md (the first column)."""
    text = (REPO / "docs" / "security.md").read_text()
    return set(re.findall(r"^\| *((?:GHSA|PYSEC|CVE)-[^ |]+) *\|", text, re.M))


def project(index: str, name: str) -> dict:
    with urllib.request.urlopen(f"{index}/{name}/json", timeout=60) as r:
        return json.load(r)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lock", type=Path, default=REPO / "requirements.lock")
    p.add_argument("--index", default="https://pypi.org/pypi")
    args = p.parse_args(argv)
    locked = pins(args.lock)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        pages = list(pool.map(lambda pin: project(args.index, pin[0]), locked))
    accepted = accepted_ids()
    unchecked, found = [], []
    for (name, version), page in zip(locked, pages):
        latest = page["info"]["version"]
        if version.split("+")[0] != latest:  # a local build tag (torch's +cpu) is the same release
            unchecked.append(f"{name}=={version} (latest {latest})")
            continue
        for vuln in page.get("vulnerabilities") or []:
            ids = {vuln["id"], *vuln.get("aliases", [])}
            found.append((name, version, vuln["id"], bool(ids & accepted), vuln.get("details", "")[:100]))
    print(f"{len(locked)} pins: {len(locked) - len(unchecked)} at their latest release checked, "
          f"{len(unchecked)} older ones not checkable here")
    for name, version, vid, ok, details in found:
        print(f"  {'accepted' if ok else 'VULNERABLE'}: {name}=={version} {vid}: {details}")
    for line in unchecked:
        print(f"  unchecked: {line}")
    bad = [f for f in found if not f[3]]
    print(f"{len(found)} known vulnerabilities, {len(bad)} unexplained")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
