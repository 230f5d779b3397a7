// /proc/self/mountinfo texts modelled on real systems, for the parser and the freeze plan.
// Raw string literals: "\040" below is the four characters the kernel writes.

enum MountInfoFixtures {
    /// Debian 12 VM: ext4 root on vda3, /boot ext4 on vda2, /boot/efi vfat on vda1, and the
    /// usual systemd pseudo filesystems (binfmt_misc over its autofs trigger, a user's /run/user).
    static let debianVM = #"""
    21 1 254:3 / / rw,relatime shared:1 - ext4 /dev/vda3 rw,errors=remount-ro
    22 21 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
    23 21 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
    24 21 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=1995712k,nr_inodes=498928,mode=755,inode64
    25 24 0:22 / /dev/pts rw,nosuid,noexec,relatime shared:3 - devpts devpts rw,gid=5,mode=620,ptmxmode=000
    26 21 0:23 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=401084k,mode=755,inode64
    27 22 0:6 / /sys/kernel/security rw,nosuid,nodev,noexec,relatime shared:8 - securityfs securityfs rw
    28 24 0:24 / /dev/shm rw,nosuid,nodev shared:4 - tmpfs tmpfs rw,inode64
    29 26 0:25 / /run/lock rw,nosuid,nodev,noexec,relatime shared:6 - tmpfs tmpfs rw,size=5120k,inode64
    30 22 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
    31 22 0:27 / /sys/fs/pstore rw,nosuid,nodev,noexec,relatime shared:10 - pstore pstore rw
    32 22 0:28 / /sys/fs/bpf rw,nosuid,nodev,noexec,relatime shared:11 - bpf bpf rw,mode=700
    33 23 0:29 / /proc/sys/fs/binfmt_misc rw,relatime shared:13 - autofs systemd-1 rw,fd=30,pgrp=1,timeout=0,minproto=5,maxproto=5,direct,pipe_ino=15562
    34 24 0:19 / /dev/mqueue rw,nosuid,nodev,noexec,relatime shared:14 - mqueue mqueue rw
    35 24 0:30 / /dev/hugepages rw,relatime shared:15 - hugetlbfs hugetlbfs rw,pagesize=2M
    36 22 0:7 / /sys/kernel/debug rw,nosuid,nodev,noexec,relatime shared:16 - debugfs debugfs rw
    37 22 0:12 / /sys/kernel/tracing rw,nosuid,nodev,noexec,relatime shared:17 - tracefs tracefs rw
    38 22 0:31 / /sys/fs/fuse/connections rw,nosuid,nodev,noexec,relatime shared:18 - fusectl fusectl rw
    39 22 0:32 / /sys/kernel/config rw,nosuid,nodev,noexec,relatime shared:19 - configfs configfs rw
    60 21 254:2 / /boot rw,relatime shared:31 - ext4 /dev/vda2 rw
    62 60 254:1 / /boot/efi rw,relatime shared:33 - vfat /dev/vda1 rw,fmask=0077,dmask=0077,codepage=437,iocharset=ascii,shortname=mixed,utf8,errors=remount-ro
    64 33 0:33 / /proc/sys/fs/binfmt_misc rw,nosuid,nodev,noexec,relatime shared:35 - binfmt_misc binfmt_misc rw
    410 26 0:45 / /run/user/1000 rw,nosuid,nodev,relatime shared:230 - tmpfs tmpfs rw,size=401080k,nr_inodes=100270,mode=700,uid=1000,gid=1000,inode64

    """#

    /// A Docker host: ext4 root on vda1, xfs on vdb1 mounted at /srv and bind-mounted
    /// (its /docker directory) at /var/lib/docker, a read-only bind of a root directory, a
    /// container's overlay, its shm tmpfs and its network namespace (nsfs, root "net:[…]").
    static let dockerHost = #"""
    25 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
    26 25 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
    27 25 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:13 - proc proc rw
    28 25 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs udev rw,size=4015616k,nr_inodes=1003904,mode=755,inode64
    29 25 0:25 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=806476k,mode=755,inode64
    30 26 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
    61 25 254:17 / /srv rw,relatime shared:32 - xfs /dev/vdb1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
    63 25 254:17 /docker /var/lib/docker rw,relatime shared:32 - xfs /dev/vdb1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota
    65 25 254:1 /etc/app /opt/app/config ro,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
    402 63 0:52 / /var/lib/docker/overlay2/9f2c1e7b5a3d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6/merged rw,relatime shared:210 - overlay overlay rw,lowerdir=/var/lib/docker/overlay2/l/Q3ZJ7X2KQ4:/var/lib/docker/overlay2/l/H4KD2M9PZ1,upperdir=/var/lib/docker/overlay2/9f2c1e7b5a3d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6/diff,workdir=/var/lib/docker/overlay2/9f2c1e7b5a3d4c6e8f0a1b2c3d4e5f60718293a4b5c6d7e8f9a0b1c2d3e4f5a6/work,nouserxattr
    411 63 0:53 / /var/lib/docker/containers/5b7e0c1d2e3f4a5b6c7d8e9f0a1b2c3d4e5f6a7b8c9d0e1f2a3b4c5d6e7f8a9b/mounts/shm rw,nosuid,nodev,noexec,relatime shared:219 - tmpfs shm rw,size=65536k,inode64
    418 29 0:4 net:[4026532301] /run/docker/netns/3c5a1f0e9b2d rw shared:224 - nsfs nsfs rw

    """#

    /// openSUSE-style btrfs root on vda2 with subvolumes @, @home, @snapshots and @var_log.
    /// As the kernel shows it (measured on 6.18): every mount of one btrfs has the same
    /// mountinfo major:minor, an anonymous 0:N, never the disk's.
    static let btrfsRoot = #"""
    26 1 0:30 /@ / rw,relatime shared:1 - btrfs /dev/vda2 rw,discard=async,space_cache=v2,subvolid=256,subvol=/@
    27 26 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
    28 26 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
    29 26 0:5 / /dev rw,nosuid,relatime shared:2 - devtmpfs devtmpfs rw,size=4096k,nr_inodes=1048576,mode=755,inode64
    30 26 0:25 / /run rw,nosuid,nodev,relatime shared:5 - tmpfs tmpfs rw,size=1623796k,nr_inodes=819200,mode=755,inode64
    60 26 254:1 / /boot/efi rw,relatime shared:30 - vfat /dev/vda1 rw,fmask=0022,dmask=0022,codepage=437,iocharset=iso8859-1,shortname=mixed,utf8,errors=remount-ro
    62 26 0:30 /@home /home rw,relatime shared:32 - btrfs /dev/vda2 rw,discard=async,space_cache=v2,subvolid=257,subvol=/@home
    64 26 0:30 /@snapshots /.snapshots rw,relatime shared:34 - btrfs /dev/vda2 rw,discard=async,space_cache=v2,subvolid=258,subvol=/@snapshots
    66 26 0:30 /@var_log /var/log rw,relatime shared:36 - btrfs /dev/vda2 rw,discard=async,space_cache=v2,subvolid=259,subvol=/@var_log

    """#

    /// The same btrfs system as some tools present it: one anonymous major:minor per subvolume
    /// (0:30, 0:31, 0:32, 0:33). The plan must group them all the same, by the source device.
    static let btrfsRootDistinctDevices = #"""
    26 1 0:30 /@ / rw,relatime shared:1 - btrfs /dev/vda2 rw,space_cache=v2,subvolid=256,subvol=/@
    27 26 0:23 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
    60 26 254:1 / /boot/efi rw,relatime shared:30 - vfat /dev/vda1 rw,fmask=0022,dmask=0022
    62 26 0:31 /@home /home rw,relatime shared:32 - btrfs /dev/vda2 rw,space_cache=v2,subvolid=257,subvol=/@home
    64 26 0:32 /@snapshots /.snapshots rw,relatime shared:34 - btrfs /dev/vda2 rw,space_cache=v2,subvolid=258,subvol=/@snapshots
    66 26 0:33 /@var_log /var/log rw,relatime shared:36 - btrfs /dev/vda2 rw,space_cache=v2,subvolid=259,subvol=/@var_log

    """#

    /// Paths with a space, a tab, a newline and a backslash (octal escapes), a FUSE mount with
    /// a subtype, an empty source (two spaces in a row) and several optional fields.
    static let escapedPaths = #"""
    21 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
    80 21 254:17 / /mnt/My\040Disk rw,relatime shared:40 master:7 propagate_from:2 - ext4 /dev/vdb1 rw
    81 21 254:33 / /srv/tab\011here rw,relatime - xfs /dev/vdc rw,attr2,inode64
    82 21 254:17 /photos\040\134raw /home/alice/Photos\040(raw) rw,relatime shared:40 - ext4 /dev/vdb1 rw
    83 21 254:49 / /media/usb\012stick rw,nosuid,nodev,relatime unbindable - exfat /dev/sd\040a1 rw,uid=1000,gid=1000,fmask=0022,dmask=0022,iocharset=utf8,errors=remount-ro
    84 21 0:61 / /mnt/sshfs rw,nosuid,nodev,relatime shared:50 - fuse.sshfs alice@build:/home/alice rw,user_id=1000,group_id=1000
    85 21 0:62 / /mnt/scratch rw,relatime - tmpfs  rw,size=1024k

    """#

    /// A file server client: NFS, virtiofs from the host, a read-only bind of a writable disk,
    /// a disk whose filesystem is read-only, a CD-ROM and a snap's squashfs on a loop device.
    static let networkAndReadOnly = #"""
    21 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
    22 21 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
    90 21 0:55 / /mnt/nfs rw,relatime shared:60 - nfs4 fileserver:/export/home rw,vers=4.2,rsize=1048576,wsize=1048576,namlen=255,hard,proto=tcp,timeo=600,retrans=2,sec=sys,clientaddr=10.0.0.5,local_lock=none,addr=10.0.0.2
    91 21 254:33 / /mnt/archive ro,relatime shared:61 - ext4 /dev/vdc rw
    92 21 11:0 / /media/cdrom ro,nosuid,nodev,relatime shared:62 - iso9660 /dev/sr0 ro,nojoliet,check=s,map=n,blocksize=2048
    93 21 254:65 / /mnt/ro-disk ro,relatime shared:63 - xfs /dev/vde ro,attr2,inode64,logbufs=8,logbsize=32k,noquota
    94 21 0:56 / /mnt/host rw,relatime shared:64 - virtiofs hostshare rw
    95 21 7:0 / /snap/core22/1380 ro,nodev,relatime shared:65 - squashfs /dev/loop0 ro,errors=continue,threads=single
    96 21 0:57 / /mnt/windows rw,relatime shared:66 - cifs //nas/share rw,vers=3.1.1,cache=strict,username=alice,uid=0,noforceuid,gid=0,noforcegid,addr=10.0.0.3

    """#

    /// A loop stack whose backing filesystem's only mount comes after it: /dev/vdb was mounted
    /// at /data, /data/images/lab.img attached to loop0 and mounted at /mnt/lab, then /data
    /// bind-mounted at /srv/data and the original lazily unmounted (`umount -l /data`).
    /// Freezing in reverse mount order would freeze /srv/data first and deadlock.
    static let loopBackingListedAfter = #"""
    21 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
    22 21 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
    23 21 0:23 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=401084k,mode=755,inode64
    70 21 7:0 / /mnt/lab rw,relatime shared:45 - ext4 /dev/loop0 rw
    75 21 254:16 / /srv/data rw,relatime shared:47 - ext4 /dev/vdb rw

    """#

    /// Encrypted LVM: vda1 /boot/efi, vda2 /boot, vda3 -> dm-crypt (253:0) -> LVM volumes
    /// vg-root (253:1) at / and vg-home (253:2) at /home; a scratch xfs image in /home on loop1.
    static let cryptLVM = #"""
    21 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg-root rw,errors=remount-ro
    22 21 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
    23 21 0:20 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw
    60 21 254:2 / /boot rw,relatime shared:31 - ext4 /dev/vda2 rw
    61 60 254:1 / /boot/efi rw,relatime shared:33 - vfat /dev/vda1 rw,fmask=0077,dmask=0077
    62 21 253:2 / /home rw,relatime shared:35 - ext4 /dev/mapper/vg-home rw
    90 21 7:1 / /mnt/scratch rw,relatime shared:50 - xfs /dev/loop1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota

    """#

    /// Three levels: /dev/vdb at /lab, /lab/outer.img on loop0 at /lab/outer, and
    /// /lab/outer/inner.img on loop1 at /lab/outer/inner.
    static let threeLevelStack = #"""
    21 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
    22 21 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
    80 21 254:16 / /lab rw,relatime shared:40 - ext4 /dev/vdb rw
    81 80 7:0 / /lab/outer rw,relatime shared:41 - ext4 /dev/loop0 rw
    82 81 7:1 / /lab/outer/inner rw,relatime shared:42 - xfs /dev/loop1 rw,attr2,inode64,logbufs=8,logbsize=32k,noquota

    """#

    /// Mounts covered by later mounts at the same path: /mnt/data (vdb1) under a tmpfs with no
    /// other mount of it; /mnt/old (xfs on vdc) under an ext4 (vdd) but also bound at /srv/xfs;
    /// /mnt/twice (vde) mounted twice over itself.
    static let shadowed = #"""
    21 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw,errors=remount-ro
    50 21 254:17 / /mnt/data rw,relatime shared:40 - ext4 /dev/vdb1 rw
    51 50 0:40 / /mnt/data rw,relatime shared:41 - tmpfs tmpfs rw,size=1024k,inode64
    52 21 254:33 / /mnt/old rw,relatime shared:42 - xfs /dev/vdc rw,attr2,inode64,noquota
    53 21 254:33 / /srv/xfs rw,relatime shared:42 - xfs /dev/vdc rw,attr2,inode64,noquota
    54 52 254:49 / /mnt/old rw,relatime shared:43 - ext4 /dev/vdd rw
    55 21 254:65 / /mnt/twice rw,relatime shared:44 - ext4 /dev/vde rw
    56 55 254:65 / /mnt/twice rw,relatime shared:44 - ext4 /dev/vde rw

    """#
}
