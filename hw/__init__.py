"""Transports: how request buffers reach a virtio-fs device and come back. Nothing here
knows FUSE; everything moves bytes in shared memory.

Modules:
    transport    the interface every transport implements (:class:`VirtioTransport`)
    memory       memory shared with the device, and an allocator of buffers in it
    virtqueue    the driver side of a split virtqueue
    queues       request buffers in and out of the queues (allocate, chain, kick, harvest)
    vhost_user/  the vhost-user frontend beside a virtiofsd on this host
    guest/       a virtio-fs PCI or MMIO device of the VM this runs in, from userspace
"""
