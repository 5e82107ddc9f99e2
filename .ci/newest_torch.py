"""Print the newest torch release on the package registry that pyproject.toml's torch requirement
admits (final releases only, no local builds such as +cpu). Exit 1 with a message if none."""
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import InvalidVersion, Version

deps = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["project"]["dependencies"]
spec = next(r.specifier for r in map(Requirement, deps) if r.name == "torch")
out = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "torch"], capture_output=True, text=True).stdout
line = next((ln for ln in out.splitlines() if ln.startswith("Available versions:")), "")
versions = []
for v in re.split(r",\s*", line.partition(":")[2].strip()):
    try:
        parsed = Version(v)
    except InvalidVersion:
        continue
    if not parsed.local and not parsed.is_prerelease and parsed in spec:
        versions.append(parsed)
if not versions:
    sys.exit(f"no torch release on the registry satisfies {spec} (pip index said: {out.strip()[:200]!r})")
print(max(versions))
