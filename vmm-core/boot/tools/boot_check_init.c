/* /init of the qemu_boot_check.sh initramfs: report what the kernel saw, then power off
 * through ACPI S5 (our \_S5 package and the FADT PM1a control block). */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <unistd.h>

int main(void) {
  char line[4096];
  /* The initramfs is packed without root, so it has no /dev/console node: find it ourselves. */
  if (fcntl(1, F_GETFD) < 0) {
    mount("devtmpfs", "/dev", "devtmpfs", 0, 0);
    int console = open("/dev/console", O_RDWR);
    if (console >= 0) {
      dup2(console, 0);
      dup2(console, 1);
      dup2(console, 2);
    }
  }
  mount("proc", "/proc", "proc", 0, 0);
  mount("sysfs", "/sys", "sysfs", 0, 0);
  FILE* file = fopen("/proc/cmdline", "r");
  if (file != NULL && fgets(line, sizeof line, file) != NULL) printf("INIT cmdline: %s", line);
  DIR* dir = opendir("/sys/firmware/acpi/tables");
  if (dir != NULL) {
    struct dirent* entry;
    printf("INIT acpi tables:");
    while ((entry = readdir(dir)) != NULL) {
      if (entry->d_name[0] != '.') printf(" %s", entry->d_name);
    }
    printf("\n");
    closedir(dir);
  }
  int cpus = 0;
  file = fopen("/proc/cpuinfo", "r");
  while (file != NULL && fgets(line, sizeof line, file) != NULL) {
    if (strncmp(line, "processor", 9) == 0) cpus++;
  }
  printf("INIT cpus: %d\nCLONE-BOOT-OK\n", cpus);
  fflush(stdout);
  sync();
  reboot(RB_POWER_OFF);
  return 1;
}
