#!/usr/bin/env bash
# Boot the cached rig once for real and check it: userspace runs (time to a marker),
# hybrid vsock works both ways (host -> guest `CONNECT <port>`, guest -> host
# `HYBRID.sock_<port>`), virtio-net gets a link and pings a bridge inside a network
# namespace created here, overlay loads. Needs root and scripts/rig/setup.sh first.
# Never writes to base.ext4 (boots a sparse copy) and deletes its namespace on exit.
set -euo pipefail
RIG=${BANGER_RIG_DIR:-/var/cache/banger-rig}
HERE=$(cd "$(dirname "$0")" && pwd)
[ -f "$RIG/rig.env" ] || { echo "run scripts/rig/setup.sh first" >&2; exit 1; }
# shellcheck disable=SC1091
. "$RIG/rig.env"
TSC_KHZ=${BANGER_RIG_TSC_KHZ:-$("$HERE/tsc-khz.sh")}

W=$(mktemp -d /tmp/banger-rig-verify.XXXXXX)
NS=banger-rig-verify-$$
VPID=""
cleanup() {
    [ -z "$VPID" ] || kill "$VPID" 2>/dev/null || true
    ip netns del "$NS" 2>/dev/null || true
    rm -rf "$W"
}
trap cleanup EXIT

cat >"$W/init" <<'EOF'
#!/bin/sh
echo "RIG-MARKER userspace $(uname -r)"
modprobe vmw_vsock_virtio_transport && modprobe virtio_net && modprobe overlay &&
    echo "RIG modules: $(cut -d' ' -f1 /proc/modules | grep -E 'vsock|virtio_net|overlay' | tr '\n' ' ')"
ip link set lo up; ip link set eth0 up; ip addr add 172.30.0.2/24 dev eth0
ip -br link show eth0
ping -c 3 -i 0.2 -W 2 172.30.0.1 | tail -n 1
echo guest-to-host | socat -t 2 - VSOCK-CONNECT:2:5678 && echo "RIG guest->host sent"
echo "RIG LISTENING"
socat VSOCK-LISTEN:1234,reuseaddr EXEC:cat
echo o > /proc/sysrq-trigger
sleep 10
EOF
chmod 755 "$W/init"
cp --sparse=always "$BANGER_RIG_ROOTFS" "$W/root.ext4"
debugfs -w -R "write $W/init /usr/sbin/rig-verify-init" "$W/root.ext4" >/dev/null 2>&1

ip netns add "$NS"
ip -n "$NS" link set lo up
ip -n "$NS" link add br0 type bridge
ip -n "$NS" addr add 172.30.0.1/24 dev br0
ip -n "$NS" link set br0 up
ip -n "$NS" tuntap add dev tap0 mode tap
ip -n "$NS" link set tap0 master br0 up

"$BANGER_RIG_VHOST_DEVICE_VSOCK" --guest-cid 3 --socket "$W/vhu.sock" --uds-path "$W/hybrid.sock" \
    >"$W/vhost.log" 2>&1 &
VPID=$!
for _ in $(seq 50); do [ -S "$W/vhu.sock" ] && break; sleep 0.1; done

QEMU=("$BANGER_RIG_QEMU" -M microvm,rtc=on,pit=on,pic=on -accel tcg -cpu max -m 512 -smp 1
    -nodefaults -no-user-config -nographic -no-reboot -serial stdio
    -kernel "$BANGER_RIG_KERNEL" -initrd "$BANGER_RIG_INITRD"
    -append "console=ttyS0 root=/dev/vda ro init=/usr/sbin/rig-verify-init reboot=t panic=-1 tsc_early_khz=$TSC_KHZ"
    -drive "id=root,file=$W/root.ext4,format=raw,if=none" -device virtio-blk-device,drive=root
    -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem
    -chardev "socket,id=c,path=$W/vhu.sock" -device vhost-user-vsock-device,chardev=c
    -netdev tap,id=n0,ifname=tap0,script=no,downscript=no
    -device virtio-net-device,netdev=n0,mac=06:00:ac:1e:00:02)
echo "== ip netns exec $NS ${QEMU[*]}"

ip netns exec "$NS" python3 - "$W" "${QEMU[@]}" <<'EOF'
import os, socket, subprocess, sys, threading, time
w, cmd = sys.argv[1], sys.argv[2:]
hy = os.path.join(w, "hybrid.sock")
got = {}
ls = socket.socket(socket.AF_UNIX); ls.bind(hy + "_5678"); ls.listen(1)
def accept():
    c, _ = ls.accept(); got["g2h"] = c.recv(100)
threading.Thread(target=accept, daemon=True).start()

def host_to_guest():
    for _ in range(100):
        s = socket.socket(socket.AF_UNIX); s.connect(hy)
        t = time.monotonic(); s.sendall(b"CONNECT 1234\n"); r = b""
        while not r.endswith(b"\n"):
            ch = s.recv(1)
            if not ch: break
            r += ch
        if r.startswith(b"OK "):
            got["handshake_ms"] = (time.monotonic() - t) * 1000; break
        s.close(); time.sleep(0.1)   # refused: closed without a reply; retry
    else:
        return
    lat = []
    for i in range(20):
        t = time.monotonic(); s.sendall(b"ping-%06d\n" % i); e = b""
        while len(e) < 12: e += s.recv(64)
        lat.append((time.monotonic() - t) * 1000)
    got["echo_ok"] = e == b"ping-000019\n"; got["echo_p50_ms"] = sorted(lat)[10]
    s.close()

log = open(os.path.join(w, "serial.log"), "w")
t0 = time.monotonic(); marks = {}
p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
th = None
for raw in p.stdout:
    line = raw.decode(errors="replace").rstrip("\r\n"); now = time.monotonic() - t0
    log.write(f"{now:7.3f} {line}\n")
    for key in ("RIG-MARKER", "RIG modules", "eth0", "rtt", "RIG guest->host", "RIG LISTENING"):
        if key in line and key not in marks:
            marks[key] = now; print(f"  {now:6.2f}s  {line.strip()}", flush=True)
    if "RIG LISTENING" in line and th is None:
        th = threading.Thread(target=host_to_guest); th.start()
rc = p.wait(); total = time.monotonic() - t0
if th: th.join(5)
print(f"  {total:6.2f}s  qemu exited {rc}")
print(f"  vsock: guest->host {got.get('g2h')!r}, host->guest handshake "
      f"{got.get('handshake_ms', float('nan')):.1f} ms, echo ok={got.get('echo_ok')} "
      f"p50 {got.get('echo_p50_ms', float('nan')):.2f} ms")
ok = (rc == 0 and "RIG-MARKER" in marks and "rtt" in marks and got.get("g2h") == b"guest-to-host\n"
      and got.get("echo_ok"))
if not ok:
    sys.stderr.write(open(os.path.join(w, "serial.log")).read()[-4000:])
    print("FAILED", file=sys.stderr); sys.exit(1)
print("OK: userspace, vsock both ways, virtio-net, overlay")
EOF
