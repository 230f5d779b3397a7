// The few shims that need _GNU_SOURCE; the rest are static inline in the header.
#define _GNU_SOURCE
#include <sys/socket.h>
#include <unistd.h>
#include <fcntl.h>
#include <errno.h>
#include <signal.h>
#include <sys/syscall.h>
#include <spawn.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include "quiesce_shims.h"

int qs_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }
int qs_syncfs(int fd) { return syncfs(fd); }

int qs_async_to_this_thread(int fd) {
    struct f_owner_ex owner = { .type = F_OWNER_TID, .pid = gettid() };
    if (fcntl(fd, F_SETOWN_EX, &owner) != 0) return -1;
    if (fcntl(fd, F_SETSIG, 0) != 0) return -1;  /* plain SIGIO */
    int flags = fcntl(fd, F_GETFL);
    return flags < 0 ? -1 : fcntl(fd, F_SETFL, flags | O_ASYNC);
}

int qs_pipe_cloexec(int fds[2]) { return pipe2(fds, O_CLOEXEC); }

int qs_eventfd(void) { return eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK); }

int qs_pidfd_open(int pid) {
#ifdef SYS_pidfd_open
    return (int)syscall(SYS_pidfd_open, pid, 0);
#else
    errno = ENOSYS;
    return -1;
#endif
}

int qs_spawn_closefrom(void *actions, int lowfd) {
    return posix_spawn_file_actions_addclosefrom_np((posix_spawn_file_actions_t *)actions, lowfd);
}

#include <malloc.h>
int qs_malloc_arena_max(int arenas) { return mallopt(M_ARENA_MAX, arenas); }

int qs_set_thread_name(const char *name) { return pthread_setname_np(pthread_self(), name); }
