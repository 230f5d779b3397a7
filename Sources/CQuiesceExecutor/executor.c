// Swift concurrency's global executor on a few plain threads, so that an idle agent never wakes
// (see quiesce_executor.h). Jobs run in FIFO order; delayed jobs (Task.sleep) wait in a list
// sorted by their CLOCK_MONOTONIC deadline. Priorities are not honoured: the agent's tasks are
// few and short, and its blocking work runs on dedicated threads anyway.
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>
#include "quiesce_executor.h"

#define SWIFTCC __attribute__((swiftcall))

// The runtime's hooks and job entry point (swift/Runtime/Concurrency.h, exported from
// libswift_Concurrency). A SerialExecutorRef is two words; the generic executor is (0, 0).
typedef SWIFTCC void (*enqueue_original)(void *job);
typedef SWIFTCC void (*enqueue_delay_original)(unsigned long long delay_ns, void *job);
typedef SWIFTCC void (*enqueue_deadline_original)(long long sec, long long nsec, long long tsec,
                                                  long long tnsec, int clock, void *job);
extern SWIFTCC void (*swift_task_enqueueGlobal_hook)(void *job, enqueue_original original);
extern SWIFTCC void (*swift_task_enqueueGlobalWithDelay_hook)(unsigned long long delay_ns, void *job,
                                                              enqueue_delay_original original);
extern SWIFTCC void (*swift_task_enqueueGlobalWithDeadline_hook)(long long sec, long long nsec, long long tsec,
                                                                 long long tnsec, int clock, void *job,
                                                                 enqueue_deadline_original original);
extern SWIFTCC void swift_job_run(void *job, void *executor_identity, uintptr_t executor_implementation);

struct node {
    void *job;
    uint64_t due;  // CLOCK_MONOTONIC ns; 0 for a ready job
    struct node *next;
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond;
static struct node *ready_head, *ready_tail;
static struct node *delayed;  // sorted by due, earliest first

static uint64_t now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static struct node *make(void *job, uint64_t due) {
    struct node *n = malloc(sizeof *n);
    if (!n) abort();  // as the runtime does when it cannot allocate a job's bookkeeping
    n->job = job;
    n->due = due;
    n->next = NULL;
    return n;
}

static void enqueue_ready(void *job) {
    struct node *n = make(job, 0);
    pthread_mutex_lock(&lock);
    if (ready_tail) ready_tail->next = n; else ready_head = n;
    ready_tail = n;
    pthread_cond_signal(&cond);
    pthread_mutex_unlock(&lock);
}

static void enqueue_at(void *job, uint64_t due) {
    struct node *n = make(job, due);
    pthread_mutex_lock(&lock);
    struct node **p = &delayed;
    while (*p && (*p)->due <= due) p = &(*p)->next;
    n->next = *p;
    *p = n;
    // A new earliest deadline: every waiter may be sleeping towards a later one.
    if (delayed == n) pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
}

static SWIFTCC void hook_enqueue(void *job, enqueue_original original) {
    (void)original;
    enqueue_ready(job);
}

static SWIFTCC void hook_delay(unsigned long long delay_ns, void *job, enqueue_delay_original original) {
    (void)original;
    enqueue_at(job, now_ns(CLOCK_MONOTONIC) + delay_ns);
}

static SWIFTCC void hook_deadline(long long sec, long long nsec, long long tsec, long long tnsec, int clock,
                                  void *job, enqueue_deadline_original original) {
    (void)original; (void)tsec; (void)tnsec;
    // Swift's clock ids: 1 continuous (CLOCK_BOOTTIME), 2 suspending (CLOCK_MONOTONIC). The
    // deadline is turned into a delay on its own clock, then into a CLOCK_MONOTONIC deadline.
    clockid_t c = clock == 1 ? CLOCK_BOOTTIME : CLOCK_MONOTONIC;
    uint64_t target = (uint64_t)(sec < 0 ? 0 : sec) * 1000000000ull + (uint64_t)(nsec < 0 ? 0 : nsec);
    uint64_t now = now_ns(c);
    uint64_t delay = target > now ? target - now : 0;
    enqueue_at(job, now_ns(CLOCK_MONOTONIC) + delay);
}

static void *worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&lock);
    for (;;) {
        uint64_t now = now_ns(CLOCK_MONOTONIC);
        while (delayed && delayed->due <= now) {  // due sleepers become ready, in deadline order
            struct node *n = delayed;
            delayed = n->next;
            n->next = NULL;
            n->due = 0;
            if (ready_tail) ready_tail->next = n; else ready_head = n;
            ready_tail = n;
        }
        if (ready_head) {
            struct node *n = ready_head;
            ready_head = n->next;
            if (!ready_head) ready_tail = NULL;
            if (ready_head) pthread_cond_signal(&cond);  // more work: hand it to another worker
            pthread_mutex_unlock(&lock);
            void *job = n->job;
            free(n);
            swift_job_run(job, NULL, 0);
            pthread_mutex_lock(&lock);
            continue;
        }
        if (delayed) {
            struct timespec ts = { .tv_sec = (time_t)(delayed->due / 1000000000ull),
                                   .tv_nsec = (long)(delayed->due % 1000000000ull) };
            pthread_cond_timedwait(&cond, &lock, &ts);
        } else {
            pthread_cond_wait(&cond, &lock);  // idle: no timeout, no wakeup
        }
    }
    return NULL;
}

int qs_install_global_executor(int threads) {
    pthread_condattr_t attr;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&cond, &attr);
    pthread_condattr_destroy(&attr);
    pthread_attr_t tattr;
    pthread_attr_init(&tattr);
    pthread_attr_setstacksize(&tattr, 512 * 1024);  // async frames live on the heap; calls need little
    // The workers inherit the installing thread's signal mask (quiesced blocks every
    // asynchronous signal before it installs this executor).
    int started = 0;
    for (int i = 0; i < (threads < 1 ? 1 : threads); i++) {
        pthread_t t;
        if (pthread_create(&t, &tattr, worker, NULL) == 0) {
            pthread_detach(t);
            started++;
        }
    }
    pthread_attr_destroy(&tattr);
    if (started == 0) return -1;
    swift_task_enqueueGlobal_hook = hook_enqueue;
    swift_task_enqueueGlobalWithDelay_hook = hook_delay;
    swift_task_enqueueGlobalWithDeadline_hook = hook_deadline;
    return 0;
}
