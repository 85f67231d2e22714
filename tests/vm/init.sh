#!/bin/sh
# /init of the guest that tests/tests/kernel_vm.rs boots under qemu: the
# distribution's kernel, this workspace's portcullisd, one veth pair between
# the root namespace (protected) and a namespace "peer" (the client).
# Every line the test checks starts with "VM:"; the guest powers off at the
# end whatever happens.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
# busybox's shell runs its own applets before PATH: iproute2 by its path.
ip() { /usr/sbin/ip "$@"; }
tc() { /usr/sbin/tc "$@"; }
ADMITTED=8080
DENIED=9090

finish() {
    echo "VM: END"
    sync
    poweroff -f
}
fail() {
    echo "VM: FAIL $*"
    finish
}
check() { # name, result (0 = the expected outcome)
    if [ "$2" = 0 ]; then echo "VM: PASS $1"; else echo "VM: FAIL $1"; fi
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /run
mount -t bpf bpf /sys/fs/bpf || fail "mount bpffs"
mkdir -p /tmp /var/lib/portcullis /run/netns
echo "VM: kernel $(uname -r)"
echo "VM: uptime-at-init $(cut -d' ' -f1 /proc/uptime)"

for m in $(cat /lib/modules/load-order); do
    insmod "/lib/modules/$m" || fail "insmod $m"
done

ip link set lo up
ip netns add peer || fail "ip netns add"
ip link add pc0 type veth peer name pc1 || fail "ip link add veth"
ip link set pc1 netns peer
ip addr add 10.200.0.1/24 dev pc0
ip link set pc0 up
ip -n peer addr add 10.200.0.2/24 dev pc1
ip -n peer link set pc1 up
ip -n peer link set lo up

# Listeners in the root namespace: each connection's bytes go to a file.
for port in $ADMITTED $DENIED; do
    ( while true; do nc -l -p "$port" >> "/tmp/got-$port"; done ) &
done
sleep 1

# probe NAME PORT: connects from the peer and sends NAME; 0 when the
# listener received it.
probe() {
    echo "$1" | ip netns exec peer timeout 5 nc -w 3 10.200.0.1 "$2" > /dev/null 2>&1
    sleep 1
    grep -qx "$1" "/tmp/got-$2"
}

# Control: without the daemon both ports answer (the check can fail).
probe control-admitted $ADMITTED; check "control: port $ADMITTED answers without the daemon" $?
probe control-denied $DENIED; check "control: port $DENIED answers without the daemon" $?

cat > /etc/portcullis.toml <<TOML
interfaces = ["pc0"]
pin_dir = "/sys/fs/bpf/portcullis"
tc_attach = "auto"
fallback = "none"
[ssh]
allow = false
[[ingress_rules]]
id = "admitted"
from_port = $ADMITTED
to_port = $ADMITTED
ip_ranges = []
protocol = "tcp"
TOML

echo "VM: starting portcullisd at $(cut -d' ' -f1 /proc/uptime)"
RUST_LOG=info NO_COLOR=1 portcullisd --config /etc/portcullis.toml \
    --state-dir /var/lib/portcullis --socket /run/portcullis.sock > /tmp/daemon.log 2>&1 &
DAEMON=$!
i=0
state=timeout
while [ $i -lt 1200 ]; do
    if grep -q ' ready' /tmp/daemon.log; then state=ready; break; fi
    if ! kill -0 $DAEMON 2>/dev/null; then state=exited; break; fi
    sleep 0.1
    i=$((i + 1))
done
echo "VM: daemon $state at $(cut -d' ' -f1 /proc/uptime)"
echo "VM: ---- daemon log ----"
cat /tmp/daemon.log
echo "VM: ---- end of daemon log ----"
[ $state = ready ] || fail "daemon did not reach ready ($state)"

probe admitted $ADMITTED; check "admitted: port $ADMITTED answers under the daemon" $?
probe denied $DENIED; r=$?; [ $r != 0 ]; check "denied: port $DENIED does not answer under the daemon" $?
ip link show pc0 | sed 's/^/VM: link /'
tc qdisc show dev pc0 | sed 's/^/VM: qdisc /'
tc filter show dev pc0 egress | sed 's/^/VM: egress /'
kill $DAEMON
finish
