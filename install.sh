#!/bin/sh
# Install thrum for the current user: a thin wrapper around `python3 thrum.py install`.
#
#   sh install.sh                  copy thrum.py to ${XDG_DATA_HOME:-~/.local/share}/thrum/,
#                                  precompile it and write a `thrum` launcher to
#                                  ${PREFIX:-~/.local/bin}
#   sh install.sh --prefix DIR     put the launcher in DIR instead
#   sh install.sh --pip            pip install this checkout (--user unless a venv is active)
#
# Someone who copied thrum.py alone runs `python3 thrum.py install` for the same result.
set -eu

here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd -P)
[ -f "$here/thrum.py" ] || { echo "install.sh: error: thrum.py not found next to install.sh (looked in $here)" >&2; exit 1; }
py=${PYTHON:-python3}
command -v "$py" >/dev/null 2>&1 || { echo "install.sh: error: $py not found; thrum needs Python 3.11 or newer" >&2; exit 1; }
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "install.sh: error: thrum needs Python 3.11 or newer; $py is $("$py" -c 'import sys; print(sys.version.split()[0])')" >&2
    exit 1
}
exec "$py" "$here/thrum.py" install "$@"
