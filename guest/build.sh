#!/usr/bin/env bash
# Build the vmferry test guest: a stock Debian kernel + an initramfs whose /init is
# memload (guest/memload.c, static) and the kernel's virtio block modules (memload loads
# them to write to a disk; $OUT/modules keeps them). Output: $OUT/vmlinuz, $OUT/initrd.img (default
# build/guest). Nothing is installed on the host: the kernel package is only downloaded
# (apt-get download) and unpacked (dpkg-deb -x). A second run with unchanged sources is
# a no-op.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
OUT=${OUT:-$HERE/../build/guest}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
stamp="$OUT/.stamp"
want=$(sha256sum "$HERE/memload.c" "$HERE/build.sh" | sha256sum | cut -c1-16)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -f "$OUT/vmlinuz" && -f "$OUT/initrd.img" ]]; then
  echo "guest image is up to date: $OUT"
  exit 0
fi
for tool in gcc cpio gzip apt-get dpkg-deb; do
  command -v "$tool" >/dev/null || { echo "guest image: '$tool' is missing (apt-get install $tool)"; exit 1; }
done
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
chmod 755 "$work"  # apt-get download runs as _apt
# The kernel: linux-image-amd64 depends on the versioned image package; download that one.
# The modules must match the kernel: both come from the same package.
MODULES=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)
if [[ ! -f "$OUT/vmlinuz" || ! -f "$OUT/modules/virtio_blk.ko" ]]; then
  pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
  if [[ -z "$pkg" ]]; then
    echo "guest image: cannot resolve linux-image-amd64 (run 'apt-get update')"; exit 1
  fi
  (cd "$work" && apt-get download -q "$pkg" >/dev/null)
  dpkg-deb -x "$work"/"$pkg"_*.deb "$work/kernel"
  cp "$work"/kernel/boot/vmlinuz-* "$OUT/vmlinuz"
  mkdir -p "$OUT/modules"
  for m in "${MODULES[@]}"; do
    ko=$(find "$work/kernel/lib/modules" -name "$m.ko" | head -1)
    [[ -n "$ko" ]] || { echo "guest image: $pkg has no $m.ko"; exit 1; }
    cp "$ko" "$OUT/modules/"
  done
  echo "kernel: $pkg"
fi
# The initramfs: /init = static memload (it mounts devtmpfs and opens the serial console).
mkdir -p "$work/initramfs/dev" "$work/initramfs/proc" "$work/initramfs/lib/modules"
gcc -O2 -static -Wall -Wextra -o "$work/initramfs/init" "$HERE/memload.c"
cp "$OUT"/modules/*.ko "$work/initramfs/lib/modules/"
(cd "$work/initramfs" && find . -mindepth 1 | sed 's|^\./||' | cpio -o -H newc --quiet > "$work/initrd.cpio")
gzip -9 < "$work/initrd.cpio" > "$OUT/initrd.img"
echo "$want" > "$stamp"
echo "guest image built: $OUT/vmlinuz $OUT/initrd.img"
