"""Guest test harness: boot a real QEMU TCG VM with a virtio-fs device and run code in it.

``image`` builds and caches the guest's kernel and initramfs from Debian packages; ``vm``
starts virtiofsd and QEMU and runs commands in the guest (a chroot into the host's root,
shared read-only over 9p); ``conftest`` gives the tests a session-wide VM factory.
"""
