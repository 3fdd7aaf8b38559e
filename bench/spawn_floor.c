/*
 * Start the benchmark's probe command GROUP_SIZE times at one instant, GROUPS times,
 * with nothing but posix_spawn(3): the least that starting that many commands costs
 * on this machine, with no interpreter and no scheduler in front of them.
 *
 * Usage: spawn_floor GROUP_SIZE GROUPS COMMAND
 *
 * Each command runs as `/bin/sh -c COMMAND` in a session of its own, as the agent runs
 * it, with TASKSCHEDULER_TASK_ID and TASKSCHEDULER_SCHEDULED_FOR (the group's slot, the
 * wall-clock time just before the first spawn) added to the environment. The groups
 * are 0.2 s apart, and each group's commands have ended before the next one starts.
 */

#define _GNU_SOURCE
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

extern char **environ;

enum { MAX_GROUP_SIZE = 1000, VARIABLE_SIZE = 128 };

static int starts_with(const char *text, const char *prefix) {
    return strncmp(text, prefix, strlen(prefix)) == 0;
}

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: %s GROUP_SIZE GROUPS COMMAND\n", argv[0]);
        return 2;
    }
    int group_size = atoi(argv[1]);
    int groups = atoi(argv[2]);
    if (group_size < 1 || group_size > MAX_GROUP_SIZE || groups < 1) {
        fprintf(stderr, "GROUP_SIZE must be 1-%d and GROUPS at least 1\n", MAX_GROUP_SIZE);
        return 2;
    }

    /* The parent's environment without its TASKSCHEDULER_ variables, then the task id and the slot. */
    int count = 0;
    while (environ[count] != NULL) {
        count++;
    }
    char **environment = calloc(count + 3, sizeof *environment);
    char (*task_ids)[VARIABLE_SIZE] = calloc(group_size, sizeof *task_ids);
    pid_t *pids = calloc(group_size, sizeof *pids);
    if (environment == NULL || task_ids == NULL || pids == NULL) {
        perror("calloc");
        return 1;
    }
    int inherited = 0;
    for (int index = 0; index < count; index++) {
        if (!starts_with(environ[index], "TASKSCHEDULER_")) {
            environment[inherited++] = environ[index];
        }
    }
    char slot_variable[VARIABLE_SIZE];
    environment[inherited + 1] = slot_variable;

    posix_spawnattr_t attributes;
    posix_spawnattr_init(&attributes);
    posix_spawnattr_setflags(&attributes, POSIX_SPAWN_SETSID);
    char *arguments[] = {"/bin/sh", "-c", argv[3], NULL};

    for (int group = 0; group < groups; group++) {
        struct timespec now;
        clock_gettime(CLOCK_REALTIME, &now);
        struct tm utc;
        gmtime_r(&now.tv_sec, &utc);
        char seconds[32];
        strftime(seconds, sizeof seconds, "%Y-%m-%dT%H:%M:%S", &utc);
        snprintf(slot_variable, sizeof slot_variable, "TASKSCHEDULER_SCHEDULED_FOR=%s.%06ldZ",
                 seconds, now.tv_nsec / 1000);

        for (int index = 0; index < group_size; index++) {
            snprintf(task_ids[index], VARIABLE_SIZE, "TASKSCHEDULER_TASK_ID=c-floor-%d-%d", group, index);
            environment[inherited] = task_ids[index];
            int error = posix_spawn(&pids[index], "/bin/sh", NULL, &attributes, arguments, environment);
            if (error != 0) {
                fprintf(stderr, "posix_spawn: %s\n", strerror(error));
                return 1;
            }
        }
        for (int index = 0; index < group_size; index++) {
            int status;
            if (waitpid(pids[index], &status, 0) < 0 || !WIFEXITED(status) || WEXITSTATUS(status) != 0) {
                fprintf(stderr, "the probe command failed: %s\n", argv[3]);
                return 1;
            }
        }
        usleep(200000);
    }
    return 0;
}
