"""The README's test command is the one CI runs, and its examples still run."""
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_ci_runs_the_readme_test_command():
    readme = ROOT.joinpath("README.md").read_text()
    ci = [line for line in ROOT.joinpath(".ci/run").read_text().splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert len(ci) == 1
    assert ci[0] in readme
    assert ci[0].endswith("python -m pytest")
    main_command = re.search(r"```bash\n(.*fastgen-sci distill.*)\n```", readme).group(1)
    assert main_command.replace("fastgen-sci distill", "").split("&&")[:-1] == ci[0].split("&&")[:-1]
