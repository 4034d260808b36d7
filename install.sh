#!/usr/bin/env bash
# Install what refany3d needs on a Debian/Ubuntu machine: OpenGL (EGL/OSMesa) libraries for the
# headless renderer, Chromium for the browser test, and the pinned Python packages. Idempotent.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive

apt_packages=($(grep -v '^#' packages.txt) chromium chromium-driver)
missing=()
for pkg in "${apt_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

python -m pip install -q -r requirements.txt
# The package itself, editable: `import refany3d` and the `refany3d` command work from any folder.
python -m pip install -q --no-deps -e .
