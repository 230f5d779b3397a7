// Linux constants and helpers that Swift's Glibc import does not expose cleanly.
#ifndef QUIESCE_SHIMS_H
#define QUIESCE_SHIMS_H

#include <stdint.h>
#include <sys/types.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/ioctl.h>
#include <sys/un.h>
#include <linux/fs.h>
#include <linux/loop.h>
#include <linux/vm_sockets.h>

static const unsigned long QS_FIFREEZE = FIFREEZE;
static const unsigned long QS_FITHAW = FITHAW;
static const unsigned long QS_IOCTL_VM_SOCKETS_GET_LOCAL_CID = IOCTL_VM_SOCKETS_GET_LOCAL_CID;
static const unsigned int QS_VMADDR_CID_ANY = VMADDR_CID_ANY;
static const unsigned int QS_VMADDR_CID_HOST = VMADDR_CID_HOST;
static const int QS_AF_VSOCK = AF_VSOCK;
/* open(2)'s O_PATH (include/uapi/asm-generic/fcntl.h, x86_64 and arm64): glibc exposes it only
   under _GNU_SOURCE, which Swift's Glibc module is not built with. */
static const int QS_O_PATH = 010000000;

/// FIFREEZE / FITHAW on an open fd. Returns 0 or -1 with errno set.
static inline int qs_fifreeze(int fd) { return ioctl(fd, FIFREEZE, 0); }
static inline int qs_fithaw(int fd) { return ioctl(fd, FITHAW, 0); }

/// The device and inode of a loop device's backing file (LOOP_GET_STATUS64).
static inline int qs_loop_backing(int fd, uint64_t *device, uint64_t *inode) {
    struct loop_info64 info;
    int rc = ioctl(fd, LOOP_GET_STATUS64, &info);
    if (rc == 0) { *device = info.lo_device; *inode = info.lo_inode; }
    return rc;
}

/// The local CID of this machine from an fd of /dev/vsock.
static inline int qs_vsock_local_cid(int fd, unsigned int *cid) {
    return ioctl(fd, IOCTL_VM_SOCKETS_GET_LOCAL_CID, cid);
}

static inline socklen_t qs_sockaddr_vm_make(struct sockaddr_vm *addr, unsigned int cid, unsigned int port) {
    __builtin_memset(addr, 0, sizeof(*addr));
    addr->svm_family = AF_VSOCK;
    addr->svm_cid = cid;
    addr->svm_port = port;
    return sizeof(*addr);
}

/// Fills a sockaddr_un; returns its length, or 0 when the path does not fit.
static inline socklen_t qs_sockaddr_un_make(struct sockaddr_un *addr, const char *path, size_t len) {
    if (len >= sizeof(addr->sun_path)) return 0;
    __builtin_memset(addr, 0, sizeof(*addr));
    addr->sun_family = AF_UNIX;
    __builtin_memcpy(addr->sun_path, path, len);
    return (socklen_t)(__builtin_offsetof(struct sockaddr_un, sun_path) + len + 1);
}

/// Peer credentials of a connected Unix socket (SO_PEERCRED).
static inline int qs_peercred(int fd, pid_t *pid, uid_t *uid, gid_t *gid) {
    struct { pid_t pid; uid_t uid; gid_t gid; } cred;
    socklen_t len = sizeof(cred);
    int rc = getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len);
    if (rc == 0) { *pid = cred.pid; *uid = cred.uid; *gid = cred.gid; }
    return rc;
}

/// accept4(SOCK_CLOEXEC) without needing _GNU_SOURCE in Swift.
int qs_accept_cloexec(int fd);

/// Asks the kernel to send SIGIO to the calling thread (not the process) when `fd` becomes
/// readable or its peer connects: O_ASYNC with an F_SETOWN_EX thread owner. Returns 0 or -1.
int qs_async_to_this_thread(int fd);

/// syncfs(2), declared only under _GNU_SOURCE.
int qs_syncfs(int fd);
int qs_unshare_fs(void);

/// ioctl with an int argument (variadic ioctl cannot be called from Swift).
static inline int qs_ioctl_int(int fd, unsigned long request, int arg) { return ioctl(fd, request, arg); }

/// pipe2(O_CLOEXEC): both ends close on exec, so no other child inherits them by accident.
int qs_pipe_cloexec(int fds[2]);

/// eventfd(0, EFD_CLOEXEC|EFD_NONBLOCK): a counter one thread bumps and another polls.
int qs_eventfd(void);

/// posix_spawn_file_actions_addclosefrom_np (glibc 2.34+): the child closes every fd from
/// `lowfd` up, so it inherits nothing the parent holds (inherited or activated sockets).
/// `actions` is a posix_spawn_file_actions_t *. Returns 0 or an errno value.
int qs_spawn_closefrom(void *actions, int lowfd);

/// mallopt(M_ARENA_MAX, arenas): at most that many glibc malloc arenas. 1 on success.
int qs_malloc_arena_max(int arenas);

/// pidfd_open(2) (Linux 5.3+): an fd that polls readable when the process ends. -1 with errno.
int qs_pidfd_open(int pid);

/// pthread_setname_np(pthread_self(), name): names the calling thread (at most 15 bytes). 0 on success.
int qs_set_thread_name(const char *name);
/// SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT and SIGSYS sent by another process become a
/// SIGTERM to this one; real faults and this process's own abort() keep their earlier action.
/// 0, or -1 with errno from sigaction(2).
int qs_stop_on_sent_fault_signals(void);
/// Starts the program at `path` (no PATH search) like posix_spawn with default signal
/// actions and an empty mask, but with prctl(PR_SET_PDEATHSIG, `death_signal`) set in the child
/// before execve: when the calling THREAD ends (prctl(2)), the kernel sends the child that
/// signal, also when the parent is SIGKILLed. posix_spawn(3) has no attribute for it, so this is
/// fork(2), with only async-signal-safe calls in the child. Returns 0 and the pid in `pid_out`,
/// or an errno value (the child's execve failure is reported through a close-on-exec pipe, and
/// that child is reaped).
int qs_spawn_tied(const char *path, char *const argv[], char *const envp[],
                  int new_process_group, int stdout_to_stderr, int death_signal, pid_t *pid_out);
/// sigwaitinfo(2) on `set`, retried on EINTR. Returns the signal (-1 and errno on failure);
/// `sender` is the pid of the process that sent it with kill(2)/sigqueue(3)/tgkill(2), -1 when the
/// kernel raised it; `fault` is the fault signal a SIGTERM from qs_stop_on_sent_fault_signals's
/// handler stands for (its `sender` is then the fault signal's sender), else 0.
int qs_sigwait_sender(const sigset_t *set, int *sender, int *fault);

#endif
