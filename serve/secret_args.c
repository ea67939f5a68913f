/* Keeps secrets out of tritonserver's command line, which every local user can read
 * (/proc/PID/cmdline, ps). Preloaded into tritonserver (LD_PRELOAD) by serve/control.py.
 *
 * An argument containing "@env:NAME" has that part replaced by the value of the environment
 * variable NAME before main() parses the arguments: main() sees the secret, the process title
 * keeps the placeholder. /proc/PID/environ is readable only by the server's own user. The
 * variables and LD_PRELOAD are then removed, so the backend processes Triton starts inherit
 * neither.
 */
#include <stdlib.h>
#include <string.h>

#define PLACEHOLDER "@env:"

__attribute__((constructor)) static void reveal_secret_args(int argc, char **argv, char **envp) {
  (void)envp;
  if (argc < 1) return;
  const char *program = strrchr(argv[0], '/');
  /* Not in setpriv, which the launcher puts in front of tritonserver: it passes all on to it. */
  if (strcmp(program != NULL ? program + 1 : argv[0], "setpriv") == 0) return;
  const char *used[64];
  int n_used = 0;
  for (int i = 1; i < argc; i++) {
    char *at = strstr(argv[i], PLACEHOLDER);
    if (at == NULL) continue;
    const char *name = at + strlen(PLACEHOLDER);
    const char *value = getenv(name);
    if (value == NULL) continue; /* Triton then takes the placeholder itself as the key: still locked */
    size_t head = (size_t)(at - argv[i]);
    char *arg = malloc(head + strlen(value) + 1);
    if (arg == NULL) abort();
    memcpy(arg, argv[i], head);
    strcpy(arg + head, value);
    if (n_used < 64) used[n_used++] = name; /* the original string stays in place: the process title */
    argv[i] = arg;
  }
  for (int i = 0; i < n_used; i++) unsetenv(used[i]);
  unsetenv("LD_PRELOAD");
}
