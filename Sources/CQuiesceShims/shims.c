// The few shims that need _GNU_SOURCE; the rest are static inline in the header.
#define _GNU_SOURCE
#include <sys/socket.h>
#include <unistd.h>
#include "quiesce_shims.h"

int qs_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }
int qs_syncfs(int fd) { return syncfs(fd); }
