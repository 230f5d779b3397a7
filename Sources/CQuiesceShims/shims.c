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
#include <sys/prctl.h>
#include <sys/wait.h>
#include <sched.h>
#include "quiesce_shims.h"

int qs_accept_cloexec(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }
int qs_syncfs(int fd) { return syncfs(fd); }
/// unshare(CLONE_FS): this thread gets its own umask, cwd and root (unshare(2)).
int qs_unshare_fs(void) { return unshare(CLONE_FS); }

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

// Fault signals sent by another process (kill -SEGV, kill -ABRT): taken as a request to stop.
// A fault signal cannot be left blocked (a real fault while it is blocked kills at once), so it
// reaches whichever thread it hits, and its default action would end the agent with the guest
// frozen. This handler tells the two apart by siginfo (signal(7), sigaction(2)): si_code <= 0
// and a pid other than ours means kill(2)/sigqueue(3) from outside, turned into a SIGTERM to
// ourselves, which the main thread's sigwait takes (thaw, then exit). A real fault (si_code > 0)
// or our own abort() gets the action that was there before (the default, or the runtime's
// crash handler): for a fault by returning to the faulting instruction, for abort() at once.
static const int fault_signals[] = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGABRT, SIGSYS};
#define FAULT_SIGNALS (int)(sizeof fault_signals / sizeof fault_signals[0])
static struct sigaction previous[FAULT_SIGNALS];

static void on_fault_signal(int sig, siginfo_t *info, void *context) {
    (void)context;
    if (info != NULL && info->si_code <= 0 && info->si_pid != getpid()) {
        // The SIGTERM carries which signal it stands for and who sent it (qs_sigwait_sender
        // unpacks them); sigqueue(3) is async-signal-safe (signal-safety(7)).
        union sigval value;
        value.sival_int = (int)(((unsigned)info->si_pid << 8) | (unsigned)sig);
        sigqueue(getpid(), SIGTERM, value);
        return;
    }
    for (int k = 0; k < FAULT_SIGNALS; k++) {
        if (fault_signals[k] == sig) sigaction(sig, &previous[k], NULL);
    }
    if (info == NULL || info->si_code <= 0) raise(sig);
}

int qs_stop_on_sent_fault_signals(void) {
    struct sigaction action;
    action.sa_sigaction = on_fault_signal;
    action.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&action.sa_mask);
    for (int k = 0; k < FAULT_SIGNALS; k++) {
        if (sigaction(fault_signals[k], &action, &previous[k]) != 0) return -1;
    }
    return 0;
}

int qs_sigwait_sender(const sigset_t *set, int *sender, int *fault) {
    siginfo_t info;
    int sig;
    do { sig = sigwaitinfo(set, &info); } while (sig < 0 && errno == EINTR);
    if (sig < 0) return -1;
    *sender = -1;
    *fault = 0;
    if (info.si_code == SI_QUEUE && info.si_pid == getpid() && sig == SIGTERM) {
        // One of ours: a fault signal sent from outside, forwarded by on_fault_signal.
        *fault = info.si_value.sival_int & 0xff;
        *sender = (int)((unsigned)info.si_value.sival_int >> 8);
    } else if (info.si_code == SI_USER || info.si_code == SI_QUEUE || info.si_code == SI_TKILL) {
        *sender = info.si_pid;
    }
    return sig;
}

int qs_spawn_tied(const char *path, char *const argv[], char *const envp[],
                  int new_process_group, int stdout_to_stderr, int death_signal, pid_t *pid_out) {
    int report[2];
    if (pipe2(report, O_CLOEXEC) != 0) return errno;
    pid_t parent = getpid();
    pid_t pid = fork();
    if (pid < 0) {
        int e = errno;
        close(report[0]);
        close(report[1]);
        return e;
    }
    if (pid == 0) {
        // The child of a threaded process: async-signal-safe calls only, until execve.
        int e = 0;
        if (new_process_group && setpgid(0, 0) != 0) e = errno;
        struct sigaction dfl;
        dfl.sa_handler = SIG_DFL;
        dfl.sa_flags = 0;
        sigemptyset(&dfl.sa_mask);
        for (int sig = 1; sig < 32; sig++) {
            if (sig != SIGKILL && sig != SIGSTOP) sigaction(sig, &dfl, NULL);
        }
        sigset_t none;
        sigemptyset(&none);
        sigprocmask(SIG_SETMASK, &none, NULL);
        if (e == 0 && stdout_to_stderr && dup2(2, 1) < 0) e = errno;
        if (e == 0 && prctl(PR_SET_PDEATHSIG, death_signal) != 0) e = errno;
        // The parent may have died before prctl: then nobody would send the signal.
        if (e == 0 && getppid() != parent) _exit(127);
        if (e == 0) {
            execve(path, argv, envp);
            e = errno;
        }
        ssize_t unused = write(report[1], &e, sizeof e);
        (void)unused;
        _exit(127);
    }
    close(report[1]);
    int e = 0;
    ssize_t n;
    do { n = read(report[0], &e, sizeof e); } while (n < 0 && errno == EINTR);
    close(report[0]);
    if (n == (ssize_t)sizeof e) {
        int status;
        while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {}
        return e;
    }
    *pid_out = pid;
    return 0;
}
