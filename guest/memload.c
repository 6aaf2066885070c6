/* memload: the vmferry test guest's /init.
 *
 * Runs as PID 1 in an initramfs under a stock Debian kernel. It fills a share of guest
 * memory with non-zero data, then dirties it at a set rate and prints a heartbeat on
 * the serial console every tick:
 *
 *     HB <seq> <monotonic_ns> <gap_ms> <dirtied_pages>
 *
 * <gap_ms> is the monotonic time between this heartbeat and the previous one, as the
 * guest saw it: after a live migration the largest gap is the downtime the guest saw.
 * (CLOCK_MONOTONIC in the guest keeps counting across a migration: kvmclock/TSC state
 * migrates with the VM, and under TCG the host clock drives it.)
 *
 * Parameters come from the kernel command line (unknown words are ignored):
 *     memload.fill=<MiB>      memory to fill at boot (default 128)
 *     memload.rate=<MiB/s>    dirty rate (default 8)
 *     memload.tick=<ms>       heartbeat / dirtying period (default 100)
 * Each filled page carries a checksum word, verified when it is rewritten: a page whose
 * content changed under the guest's feet (a page lost by a migration) is reported as
 *     CORRUPT page=<n> ...
 * on the console.
 *
 * The disk (when the VM has one): the initramfs carries the virtio block modules of its
 * kernel (/lib/modules/NAME.ko, loaded in order); when a virtio disk /dev/vda shows up,
 * every heartbeat also writes one 4 KiB record to block <seq + 1> of it, O_DIRECT and
 * O_DSYNC (on the image when the heartbeat prints):
 *     word 0 "VMFDISK1", word 1 seq, word 2 monotonic ns, word 3 checksum of words
 *     4..511, words 4.. pseudo-random data of this seq
 * Block 0 is left alone. After a migration, the records must run 0, 1, 2, ... without a
 * gap or a repeat (tests/support/guest_disk.py reads them). A failed write prints
 *     DISKERR seq=<n> errno=<e>
 * Bulk disk writes (the storage bench): with memload.diskrate=<MiB/s> (default 0) each
 * tick also writes rate * tick of data to the disk, one O_DIRECT write, cycling through
 * memload.diskspan=<MiB> (default 256) from 64 MiB on (past the records).
 * Without modules or without a disk, the guest behaves as before.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint64_t xorshift(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

static long param(const char *cmdline, const char *name, long fallback) {
    const char *p = strstr(cmdline, name);
    if (!p) return fallback;
    p += strlen(name);
    if (*p != '=') return fallback;
    return strtol(p + 1, NULL, 10);
}

/* Page layout: word 0 = page index, word 1 = generation, word 2 = checksum of the
 * rest, words 3.. = pseudo-random data of this generation. */
static void write_page(uint64_t *page, uint64_t index, uint64_t gen) {
    uint64_t s = (index + 1) * 0x9E3779B97F4A7C15ull ^ (gen * 0xBF58476D1CE4E5B9ull);
    uint64_t sum = 0;
    if (!s) s = 1;
    for (int i = 3; i < PAGE / 8; i++) {
        uint64_t v = xorshift(&s);
        page[i] = v;
        sum += v;
    }
    page[0] = index;
    page[1] = gen;
    page[2] = sum;
}

static int check_page(const uint64_t *page, uint64_t index) {
    uint64_t sum = 0;
    for (int i = 3; i < PAGE / 8; i++) sum += page[i];
    return page[0] == index && page[2] == sum;
}

#define DISK_MAGIC 0x314B534944464D56ull /* "VMFDISK1" little-endian */
static const char *const MODULES[] = {
    "virtio_ring", "virtio", "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_pci",
    "virtio_blk",
};

static int has_virtio_disk(void) {
    /* PCI 1af4:1001 (legacy) or 1af4:1042 (modern): a virtio block device */
    char path[128], buf[16];
    for (int bus = 0; bus < 32; bus++) {
        snprintf(path, sizeof path, "/sys/bus/pci/devices/0000:00:%02x.0/device", bus);
        int fd = open(path, O_RDONLY);
        if (fd < 0) continue;
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n > 0) {
            buf[n] = 0;
            if (!strncmp(buf, "0x1001", 6) || !strncmp(buf, "0x1042", 6)) return 1;
        }
    }
    return 0;
}

/* Load the virtio block modules and open /dev/vda; -1 when there is no disk. */
static int open_disk(void) {
    mkdir("/sys", 0755);
    mount("sysfs", "/sys", "sysfs", 0, NULL);
    if (!has_virtio_disk()) return -1;
    for (size_t i = 0; i < sizeof MODULES / sizeof MODULES[0]; i++) {
        char path[128];
        snprintf(path, sizeof path, "/lib/modules/%s.ko", MODULES[i]);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) {
            printf("memload: no %s: the disk is not used\n", path);
            return -1;
        }
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST)
            printf("memload: loading %s: errno %d\n", path, errno);
        close(fd);
    }
    for (int i = 0; i < 200; i++) { /* devtmpfs adds the node once the disk probed */
        int fd = open("/dev/vda", O_RDWR | O_DIRECT | O_DSYNC);
        if (fd >= 0) return fd;
        struct timespec ts = {0, 10 * 1000000L};
        nanosleep(&ts, NULL);
    }
    printf("memload: a virtio disk is present but /dev/vda did not appear\n");
    return -1;
}

static void disk_record(uint64_t *block, uint64_t seq, uint64_t t) {
    uint64_t s = (seq + 1) * 0x9E3779B97F4A7C15ull;
    uint64_t sum = 0;
    for (int i = 4; i < PAGE / 8; i++) {
        uint64_t v = xorshift(&s);
        block[i] = v;
        sum += v;
    }
    block[0] = DISK_MAGIC;
    block[1] = seq;
    block[2] = t;
    block[3] = sum;
}

int main(void) {
    char cmdline[4096] = "";
    mkdir("/proc", 0755);
    mount("proc", "/proc", "proc", 0, NULL);
    /* The initramfs has no /dev/console node (built without mknod): mount devtmpfs and
     * point stdout/stderr at the serial console. */
    mkdir("/dev", 0755);
    mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
    int console = open("/dev/ttyS0", O_WRONLY | O_NOCTTY);
    if (console < 0) console = open("/dev/console", O_WRONLY | O_NOCTTY);
    if (console >= 0) {
        dup2(console, 1);
        dup2(console, 2);
        if (console > 2) close(console);
    }
    int fd = open("/proc/cmdline", O_RDONLY);
    if (fd >= 0) {
        ssize_t n = read(fd, cmdline, sizeof cmdline - 1);
        if (n > 0) cmdline[n] = 0;
        close(fd);
    }
    long fill_mib = param(cmdline, "memload.fill", 128);
    long rate_mib = param(cmdline, "memload.rate", 8);
    long tick_ms = param(cmdline, "memload.tick", 100);
    long disk_rate_mib = param(cmdline, "memload.diskrate", 0);
    long disk_span_mib = param(cmdline, "memload.diskspan", 256);
    if (tick_ms < 1) tick_ms = 1;
    size_t pages = (size_t)fill_mib * (1 << 20) / PAGE;
    if (pages < 1) pages = 1;
    uint8_t *mem = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (mem == MAP_FAILED) {
        printf("memload: cannot map %ld MiB\n", fill_mib);
        fflush(stdout);
        for (;;) pause();
    }
    uint64_t *gens = calloc(pages, sizeof(uint64_t));
    int disk = open_disk();
    uint64_t *block = NULL;
    if (disk >= 0 && posix_memalign((void **)&block, PAGE, PAGE) != 0) disk = -1;
    if (disk >= 0) printf("memload: disk /dev/vda: one record per heartbeat\n");
    /* bulk writes: a whole number of pages per tick, within the span */
    uint64_t bulk_bytes = (uint64_t)disk_rate_mib * (1 << 20) * (uint64_t)tick_ms / 1000;
    bulk_bytes -= bulk_bytes % PAGE;
    uint64_t span = (uint64_t)disk_span_mib << 20, bulk_at = 0;
    const off_t bulk_base = (off_t)64 << 20;
    uint8_t *bulk = NULL;
    if (disk < 0 || bulk_bytes == 0 || bulk_bytes > span ||
        posix_memalign((void **)&bulk, PAGE, bulk_bytes) != 0)
        bulk_bytes = 0;
    if (bulk_bytes) {
        for (uint64_t i = 0; i < bulk_bytes; i++) bulk[i] = (uint8_t)(i * 131 + 7);
        printf("memload: disk: %ld MiB/s of bulk writes over %ld MiB\n", disk_rate_mib,
               disk_span_mib);
    }
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < pages; i++) write_page((uint64_t *)(mem + i * PAGE), i, 0);
    printf("memload: filled %ld MiB in %.0f ms; dirtying %ld MiB/s, tick %ld ms\n", fill_mib,
           (now_ns() - t0) / 1e6, rate_mib, tick_ms);
    fflush(stdout);

    uint64_t per_tick = (uint64_t)rate_mib * (1 << 20) / PAGE * (uint64_t)tick_ms / 1000;
    uint64_t seq = 0, cursor = 0, total = 0, corrupt = 0;
    uint64_t last = now_ns();
    uint64_t next = last;
    for (;;) {
        for (uint64_t k = 0; k < per_tick; k++) {
            size_t i = (size_t)(cursor++ % pages);
            uint64_t *page = (uint64_t *)(mem + i * PAGE);
            if (!check_page(page, i) || page[1] != gens[i]) {
                corrupt++;
                printf("CORRUPT page=%zu gen=%llu expected_gen=%llu\n", i,
                       (unsigned long long)page[1], (unsigned long long)gens[i]);
            }
            write_page(page, i, ++gens[i]);
            total++;
        }
        next += (uint64_t)tick_ms * 1000000ull;
        uint64_t t = now_ns();
        if (next > t) {
            struct timespec ts = {(time_t)((next - t) / 1000000000ull),
                                  (long)((next - t) % 1000000000ull)};
            nanosleep(&ts, NULL);
        } else {
            next = t;
        }
        t = now_ns();
        if (disk >= 0) {
            disk_record(block, seq, t);
            if (pwrite(disk, block, PAGE, (off_t)((seq + 1) * PAGE)) != PAGE)
                printf("DISKERR seq=%llu errno=%d\n", (unsigned long long)seq, errno);
            if (bulk_bytes) {
                if (bulk_at + bulk_bytes > span) bulk_at = 0;
                ((uint64_t *)bulk)[0] = seq;
                if (pwrite(disk, bulk, bulk_bytes, bulk_base + (off_t)bulk_at) !=
                    (ssize_t)bulk_bytes)
                    printf("DISKERR bulk seq=%llu errno=%d\n", (unsigned long long)seq, errno);
                bulk_at += bulk_bytes;
            }
        }
        printf("HB %llu %llu %.3f %llu %llu\n", (unsigned long long)seq++,
               (unsigned long long)t, (t - last) / 1e6, (unsigned long long)total,
               (unsigned long long)corrupt);
        fflush(stdout);
        last = t;
    }
}
