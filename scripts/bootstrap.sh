#!/usr/bin/env bash
# Set up CycGuard on a fresh Debian machine: Debian tools (as root), a virtual environment
# in .venv, and the package with its extras. Safe to rerun: it skips what is already done.
#   scripts/bootstrap.sh run   # what `make demo` needs: the package, CPU torch
#   scripts/bootstrap.sh dev   # + test tools, training data, ismrmrd-tools, bart, orthanc (a PACS for the tests)
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
case "$mode" in
  run) extras="" ; debs="" ;;
  dev) extras="[dev,data,scale]" ; debs="ismrmrd-tools bart orthanc openssl dicom3tools" ;;
  *) echo "usage: $0 run|dev" >&2; exit 2 ;;
esac

missing=""
for pkg in $debs; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "bootstrap: apt-get install$missing" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
  else
    echo "bootstrap: please install the Debian packages:$missing (tests that need them fail under CI, skip elsewhere)" >&2
  fi
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.install-stamp
hash=$(cat setup.cfg constraints.txt | sha256sum | cut -c1-16)
want="$mode $hash"
# a dev install already holds everything a run install needs
if [ "$mode" = run ] && [ -f "$stamp" ] && grep -qx "dev $hash" "$stamp"; then want="dev $hash"; fi
if [ ! -f "$stamp" ] || ! grep -qx "$want" "$stamp"; then
  echo "bootstrap: installing cycguard$extras into .venv (torch pinned by constraints.txt)" >&2
  .venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -m pip install -q -c constraints.txt "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -m pip install -q -c constraints.txt -e ".$extras" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import recon, torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$want" > "$stamp"
fi
# the editable install does not copy the start-up hook that stops gadgetron-python at a closed socket
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cmp -s gadgets/cycguard-gadgetron.pth "$site/cycguard-gadgetron.pth" || cp gadgets/cycguard-gadgetron.pth "$site/"

# dev: the real Gadgetron 4.7.2 server and client for the tests marked `gadgetron`, unpacked into
# .cache/gadgetron from the prepared package in tools/gadgetron (CYCGUARD_GADGETRON_TOOL: another
# copy's folder; its README says what it holds)
if [ "$mode" = dev ]; then
  tool=${CYCGUARD_GADGETRON_TOOL:-tools/gadgetron}
  home=${CYCGUARD_GADGETRON_HOME:-.cache/gadgetron}
  if [ -f "$tool/gadgetron.sh" ]; then
    [ -x "$home/gadgetron-4.7.2-cpu/bin/gadgetron" ] || echo "bootstrap: unpacking the real Gadgetron into $home" >&2
    bash "$tool/gadgetron.sh" install "$home" 2>/dev/null || echo "bootstrap: Gadgetron could not be installed (tests marked gadgetron fail under CI)" >&2
  else
    echo "bootstrap: no Gadgetron package at $tool: tests marked gadgetron fail under CI, skip elsewhere" >&2
  fi
fi
