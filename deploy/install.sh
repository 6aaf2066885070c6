#!/bin/bash
# Install one vmferry role on a Debian host (README "Install on hosts").
#
#   deploy/install.sh controller|handler|sync-controller [--wheel FILE] [--no-start]
#
# 1. Debian packages the role needs (python3-venv; the handler also iproute2);
# 2. the system user `vmferry` (controller and sync controller run as it; the handler
#    runs as root with CAP_NET_ADMIN only, see the unit);
# 3. a virtual environment /opt/vmferry/venv with the wheel (`make dist`) and its
#    dependencies at the versions of dist/constraints.txt (from requirements.lock);
# 4. /etc/vmferry (root:vmferry 0750) with /etc/vmferry/ROLE.toml from deploy/examples
#    when there is none (an existing file is never overwritten), /etc/vmferry/pki;
#    /var/lib/vmferry (vmferry:vmferry 0750);
# 5. the unit /etc/systemd/system/vmferry-ROLE.service; then, when the host runs
#    systemd, `systemctl daemon-reload` and `enable`, and `start` once the certificate
#    and key named in ROLE.toml exist (else it says what to do first).
# Re-running it upgrades the wheel and the unit and keeps the configuration.
set -euo pipefail

PREFIX=/opt/vmferry
VENV=$PREFIX/venv
ETC=/etc/vmferry
STATE=/var/lib/vmferry
UNITS=/etc/systemd/system
USER_NAME=vmferry

here=$(cd "$(dirname "$0")" && pwd)
dist=$(cd "$here/.." && pwd)/dist

die() { echo "install.sh: error: $*" >&2; exit 2; }
say() { echo "install.sh: $*"; }

role=${1:-}
case "$role" in
  controller|handler|sync-controller) shift ;;
  *) die "usage: $0 controller|handler|sync-controller [--wheel FILE] [--no-start]" ;;
esac
wheel=""
start=yes
while [ $# -gt 0 ]; do
  case "$1" in
    --wheel) wheel=${2:?--wheel needs a file}; shift 2 ;;
    --no-start) start=no; shift ;;
    *) die "unknown option $1" ;;
  esac
done
[ "$(id -u)" = 0 ] || die "run as root (it creates a user, /opt/vmferry and a systemd unit)"
if [ -z "$wheel" ]; then
  wheel=$(ls -1 "$dist"/vmferry-*.whl 2>/dev/null | sort -V | tail -1 || true)
  [ -n "$wheel" ] || die "no wheel in $dist: run 'make dist' first, or pass --wheel FILE"
fi
[ -f "$wheel" ] || die "wheel $wheel does not exist"
constraints=$(dirname "$wheel")/constraints.txt
[ -f "$constraints" ] || die "$constraints is missing ('make dist' writes it next to the wheel)"

# 1. packages
need=()
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
[ "$role" = handler ] && ! command -v ip >/dev/null && need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}"
fi

# 2. the system user of the control-plane daemons (owns /var/lib/vmferry, reads /etc/vmferry)
if ! getent passwd "$USER_NAME" >/dev/null; then
  say "creating the system user $USER_NAME"
  useradd --system --user-group --home-dir "$STATE" --no-create-home \
    --shell /usr/sbin/nologin --comment "vmferry daemons" "$USER_NAME"
fi

# 3. the virtual environment
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade --constraint "$constraints" "$wheel"
"$VENV/bin/pip" install --quiet --force-reinstall --no-deps "$wheel"  # same version, new build
say "installed $(basename "$wheel") in $VENV"

# 4. configuration and state
install -d -m 0750 -o root -g "$USER_NAME" "$ETC" "$ETC/pki"
case $role in  # the daemon renews its own certificate in that directory (README "Rotation")
  controller) install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$ETC/pki/servers" ;;
  sync-controller) install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$ETC/pki/sync" ;;
esac
if [ ! -e "$ETC/$role.toml" ]; then
  install -m 0640 -o root -g "$USER_NAME" "$here/examples/$role.toml" "$ETC/$role.toml"
  say "wrote $ETC/$role.toml from deploy/examples: edit its addresses and names"
fi
install -d -m 0750 -o "$USER_NAME" -g "$USER_NAME" "$STATE"

# 5. the unit
install -m 0644 "$here/systemd/vmferry-$role.service" "$UNITS/vmferry-$role.service"
say "installed $UNITS/vmferry-$role.service"
if [ ! -d /run/systemd/system ]; then
  say "this host does not run systemd: start it with 'systemctl start vmferry-$role' on one that does"
  exit 0
fi
systemctl daemon-reload
systemctl enable --quiet "vmferry-$role.service"
missing=()
for key in ca cert key; do
  file=$(sed -n "s/^$key *= *\"\\(.*\\)\".*/\\1/p" "$ETC/$role.toml")
  [ -n "$file" ] && [ ! -e "$file" ] && missing+=("$file")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "not started: ${missing[*]} missing (README 'Install on hosts': certificates), then"
  say "  systemctl start vmferry-$role"
elif [ "$start" = yes ]; then
  systemctl restart "vmferry-$role.service"
  say "vmferry-$role is $(systemctl is-active "vmferry-$role.service")"
fi
