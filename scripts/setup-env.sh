# Sourced (not run) from the repository root by .ci/run and demo/run: installs the Debian packages the tests and
# the demo use, then makes .venv with the project (editable) and its test extras. Needs root on a fresh machine
# (apt-get); afterwards it only checks that everything is there.
#
# PYTHON names the interpreter for a new .venv (default python3).

export DEBIAN_FRONTEND=noninteractive
SETUP_APT_PACKAGES="dbus-daemon dbus-bin libglib2.0-bin systemd etcd-server etcd-client gdisk cgpt openssl bzip2 python3-venv util-linux dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel lintian git postgresql chromium chromium-driver"

setup_env_missing=""
for setup_env_pkg in $SETUP_APT_PACKAGES; do
    dpkg-query -W -f='${Status}' "$setup_env_pkg" 2>/dev/null | grep -q "ok installed" \
        || setup_env_missing="$setup_env_missing $setup_env_pkg"
done
if [ -n "$setup_env_missing" ]; then
    echo "setup: installing$setup_env_missing"
    apt-get update -qq
    # shellcheck disable=SC2086  # one word per package
    apt-get install -y -qq $setup_env_missing >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "${PYTHON:-python3}" -m venv .venv
fi
# The project is installed editable, so only a change of its packaging (dependencies, entry points) needs pip
# again: the stamp records the packaging files it was installed from.
setup_env_stamp=.venv/.coreos-update-stack-installed
setup_env_want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat "$setup_env_stamp" 2>/dev/null)" != "$setup_env_want" ]; then
    echo "setup: installing the project and its test tools into .venv"
    .venv/bin/pip install -q --upgrade pip >/dev/null
    .venv/bin/pip install -q -e '.[test]'
    echo "$setup_env_want" > "$setup_env_stamp"
fi
unset setup_env_missing setup_env_pkg setup_env_stamp setup_env_want
