#!/bin/sh
# /init of the guest's initramfs (busybox sh). Settings come from the kernel command line as
# pvfs.NAME=VALUE (the kernel ignores unknown dotted parameters):
#   fsdrv      driver for the virtio-fs device: uio_pci_generic, virtio_pci or none (PCI);
#              none or virtio_mmio (MMIO)
#   hugepages  2 MiB pages to reserve
#   net        1: virtio-net with QEMU's user network (10.0.2.15/24, gateway 10.0.2.2)
#   rootcache  9p cache mode of the host's root (read-only): loose or none
#   msize      9p message size
#   checkout   the host path of the project's checkout: its own 9p export (read-only) is
#              mounted there in the chroot, so a checkout under /tmp (the chroot's /tmp
#              is a tmpfs) is seen too
#   views      virtio-fs devices left to the kernel's own virtiofs driver, as SLOT:NAME,...
#              (PCI 0000:00:SLOT.0, tag view-NAME): each is mounted at
#              /tmp/guest-shares/NAME in the chroot
# It loads the modules, steers the virtio-fs device, mounts the host's root (9p, read-only)
# at /mnt/host and the results share (9p, writable) at /mnt/results, prepares a chroot
# (fresh proc, sys, dev, hugetlbfs, tmpfs /tmp and /run, the results share at
# /tmp/guest-results), writes results/ready, then runs each job the host drops as
# results/jobs/N.sh (N = 1, 2, ...) in the chroot, in the background, writing N.out, N.err
# and finally N.rc ("status uptime"). results/jobs/poweroff powers the guest off. Any failure
# reboots the guest, which ends QEMU (-no-reboot); so does a panic (panic=-1).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
R=/mnt/host
OUT=/mnt/results

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

log() { echo "pvfs-init: $*"; }
fail() {
    log "FATAL: $*"
    [ -d $OUT/jobs ] && echo "$*" > $OUT/init-error
    sync
    reboot -f
    sleep 5
    echo b > /proc/sysrq-trigger
}
param() {
    v=$2
    for w in $(cat /proc/cmdline); do
        case "$w" in pvfs.$1=*) v=${w#*=} ;; esac
    done
    echo "$v"
}
# load NAME: insmod NAME's dependencies (listed in load order by the image builder), then NAME.
load() {
    for m in $(cat /modules/$1.deps) $1; do
        [ -d /sys/module/$m ] || insmod /modules/$m.ko || fail "insmod $m"
    done
}

FSDRV=$(param fsdrv uio_pci_generic)
HUGEPAGES=$(param hugepages 64)
NET=$(param net 1)
ROOTCACHE=$(param rootcache loose)
MSIZE=$(param msize 512000)
log "up $(cut -d' ' -f1 /proc/uptime) s; fsdrv=$FSDRV hugepages=$HUGEPAGES net=$NET"

load virtio
load virtio_ring

# PCI: steer the virtio-fs functions (1af4:105a) before virtio_pci can claim them.
VIEWS=$(param views "" | tr ',' ' ')
CHECKOUT=$(param checkout "")
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] || continue
    if [ "$(cat $d/vendor)" = 0x1af4 ] && [ "$(cat $d/device)" = 0x105a ]; then
        view=
        for v in $VIEWS; do
            [ "${d##*/}" = "0000:00:${v%%:*}.0" ] && view=${v#*:}
        done
        if [ -n "$view" ]; then
            echo virtio-pci > $d/driver_override
            log "virtio-fs PCI device ${d##*/} -> virtiofs (view of $view)"
            continue
        fi
        case "$FSDRV" in
            virtio_pci) ;;
            uio_pci_generic) echo uio_pci_generic > $d/driver_override ;;
            *) echo none > $d/driver_override ;;
        esac
        log "virtio-fs PCI device ${d##*/} -> $FSDRV"
    fi
done
load uio_pci_generic
load virtio_pci

# MMIO: the transports are ACPI platform devices (LNRO0005) whose registers are free to read
# before virtio_mmio loads; steer the one with device id 26 (file system).
for d in /sys/bus/platform/devices/LNRO0005:*; do
    [ -e "$d" ] || continue
    name=${d##*/}
    base=$(grep " : $name\$" /proc/iomem | sed -n '1s/^ *\([0-9a-f]*\)-.*/\1/p')
    [ -n "$base" ] || continue
    id=$(devmem $((0x$base + 8)) 32)
    if [ "$((id))" = 26 ]; then
        [ "$FSDRV" = virtio_mmio ] || echo none > $d/driver_override
        log "virtio-fs MMIO device $name at 0x$base -> $FSDRV"
    fi
done
load virtio_mmio

load 9pnet_virtio
load 9p
mount -t 9p -o trans=virtio,version=9p2000.L,msize=$MSIZE,cache=$ROOTCACHE,ro hostroot $R \
    || fail "mount hostroot"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=$MSIZE,cache=none results $OUT \
    || fail "mount results"
mkdir -p $OUT/jobs

ip link set lo up
if [ "$NET" = 1 ]; then
    load virtio_net
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 \
        && ip route add default via 10.0.2.2 || fail "network"
fi

echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages

mount -t proc proc $R/proc || fail "mount proc"
mount -t sysfs sysfs $R/sys || fail "mount sys"
mount -t devtmpfs devtmpfs $R/dev || fail "mount dev"
mkdir -p $R/dev/pts $R/dev/shm $R/dev/hugepages
mount -t devpts devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t hugetlbfs hugetlbfs $R/dev/hugepages || fail "mount hugetlbfs"
mount -t tmpfs -o mode=1777 tmpfs $R/tmp || fail "mount tmp"
[ -d $R/run ] && mount -t tmpfs -o mode=755 tmpfs $R/run
mkdir -p $R/tmp/guest-results
mount --bind $OUT $R/tmp/guest-results || fail "bind results"
if [ -n "$CHECKOUT" ]; then
    mkdir -p "$R$CHECKOUT"
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=$MSIZE,cache=$ROOTCACHE,ro checkout \
        "$R$CHECKOUT" || fail "mount checkout"
fi
[ -n "$VIEWS" ] && load virtiofs
for v in $VIEWS; do
    mkdir -p $R/tmp/guest-shares/${v#*:}
    mount -t virtiofs view-${v#*:} $R/tmp/guest-shares/${v#*:} || fail "mount view ${v#*:}"
done

{
    echo "uptime=$(cut -d' ' -f1 /proc/uptime)"
    echo "release=$(uname -r)"
    echo "hugepages=$(cat /proc/sys/vm/nr_hugepages)"
} > $OUT/ready.tmp && mv $OUT/ready.tmp $OUT/ready
log "ready after $(cut -d' ' -f1 /proc/uptime) s"

n=1
while :; do
    j=$OUT/jobs/$n
    if [ -e $j.sh ]; then
        log "job $n"
        (
            chroot $R /bin/sh /tmp/guest-results/jobs/$n.sh < /dev/null > $j.out 2> $j.err
            echo "$? $(cut -d' ' -f1 /proc/uptime)" > $j.rc.tmp
            mv $j.rc.tmp $j.rc
        ) &
        n=$((n + 1))
    elif [ -e $OUT/jobs/poweroff ]; then
        break
    else
        sleep 0.1
    fi
done
log "power off"
sync
poweroff -f
sleep 5
reboot -f
