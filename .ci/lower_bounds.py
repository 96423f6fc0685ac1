"""Print pip constraints that pin every bounded requirement of pyproject.toml to its lower bound
(`name>=X,<Y` -> `name==X`), for `make test-oldest`. torch is left out (see the Makefile)."""
import re
import sys
import tomllib

with open(sys.argv[1], "rb") as f:
    project = tomllib.load(f)["project"]
reqs = list(project["dependencies"])
reqs += project["optional-dependencies"]["test"]   # what `make test-oldest` installs
seen = set()
for req in reqs:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)", req.split(";")[0])
    if m and m.group(1).lower() != "torch" and m.group(1).lower() not in seen:
        seen.add(m.group(1).lower())
        print(f"{m.group(1)}=={m.group(2)}")
