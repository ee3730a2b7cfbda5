"""Make the Python environment of the interpreter given as argument see this interpreter's
packages after its own: write a ``.pth`` into its site-packages that adds each of our site
folders (with their ``.pth`` files, so editable installs work). Used by ``scripts/test.sh``
for the Triton 3.6 side environment; rerun each time, as the running interpreter may change."""

import site
import subprocess
import sys

ours = site.getsitepackages() + ([site.getusersitepackages()] if site.ENABLE_USER_SITE else [])
theirs = subprocess.run([sys.argv[1], "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                        capture_output=True, text=True, check=True).stdout.strip()
lines = "".join(f"import site; site.addsitedir({p!r})\n" for p in ours)
with open(f"{theirs}/fastrlhf_parent_site.pth", "w") as f:
    f.write(lines)
