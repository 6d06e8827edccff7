/*
 * fsxlite: a small file-system exerciser in the manner of fsx, written for pyvirtiofs'
 * mount benchmark (pyvirtiofs/tools/mountbench.py). MIT, like the rest of the project.
 *
 *   fsxlite [-N numops] [-S seed] [-l maxlen] [-o maxoplen] [-c closeprob] [-q] FILE
 *
 * One file, a random sequence of operations through a file descriptor — read, write,
 * truncate, fallocate, punch hole, zero range, fsync — and, with probability 1/closeprob,
 * a close and reopen between two of them. No mmap (as fsx -R -W). A shadow copy of the
 * file in memory is updated by every operation; every read is compared with it, and so is
 * the whole file at the end (and its size after truncates and reopens). Operations the file
 * system refuses with EOPNOTSUPP are probed once at start and then left out. Same seed,
 * same operations: two runs on two file systems send comparable work.
 *
 * Exit status 0 when every check passed; 1 with the first mismatch and the last
 * operations on stderr; 2 on a usage or system error.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <linux/falloc.h>

enum { OP_READ, OP_WRITE, OP_TRUNCATE, OP_FALLOCATE, OP_PUNCH, OP_ZERO, OP_FSYNC, OP_COUNT };
static const char *op_names[OP_COUNT] = {"read", "write", "truncate", "fallocate",
                                         "punch_hole", "zero_range", "fsync"};
/* How often each operation is drawn (reads and writes dominate, as in fsx). */
static const int op_weight[OP_COUNT] = {4, 4, 1, 1, 1, 1, 1};

static char *fname;
static int fd = -1;
static unsigned char *good, *temp;
static long file_size, maxlen = 256 * 1024, maxoplen = 64 * 1024;
static int enabled[OP_COUNT];
static int quiet;
static uint64_t rng_state = 1;

#define LOG_SIZE 32
static struct { long n; int op; long off, len, size_before; } oplog[LOG_SIZE];
static long opnum;

static uint64_t rnd(void)
{
    /* xorshift64*: deterministic for a seed, the same on every machine. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static void dump_log(void)
{
    long first = opnum > LOG_SIZE ? opnum - LOG_SIZE : 0;
    fprintf(stderr, "last operations:\n");
    for (long i = first; i < opnum; i++) {
        int k = (int)(i % LOG_SIZE);
        fprintf(stderr, "  %6ld %-10s off 0x%lx len 0x%lx (size was 0x%lx)\n", oplog[k].n,
                op_names[oplog[k].op], oplog[k].off, oplog[k].len, oplog[k].size_before);
    }
}

static void fail(const char *what)
{
    fprintf(stderr, "fsxlite: %s: op %ld: %s\n", fname, opnum, what);
    dump_log();
    exit(1);
}

static void die(const char *what)
{
    fprintf(stderr, "fsxlite: %s: op %ld: %s: %s\n", fname, opnum, what, strerror(errno));
    dump_log();
    exit(2);
}

static void reopen(void)
{
    if (fd >= 0 && close(fd) < 0)
        die("close");
    fd = open(fname, O_RDWR);
    if (fd < 0)
        die("open");
}

static void check_size(void)
{
    struct stat st;
    if (fstat(fd, &st) < 0)
        die("fstat");
    if (st.st_size != file_size) {
        char msg[128];
        snprintf(msg, sizeof msg, "size is 0x%lx, expected 0x%lx", (long)st.st_size, file_size);
        fail(msg);
    }
}

static void check_range(long off, long len)
{
    long done = 0;
    while (done < len) {
        ssize_t n = pread(fd, temp + done, (size_t)(len - done), off + done);
        if (n < 0)
            die("pread");
        if (n == 0)
            break;
        done += n;
    }
    if (done != len) {
        char msg[128];
        snprintf(msg, sizeof msg, "short read at 0x%lx: 0x%lx of 0x%lx", off, done, len);
        fail(msg);
    }
    if (memcmp(good + off, temp, (size_t)len) != 0) {
        long i = 0;
        while (good[off + i] == temp[i])
            i++;
        char msg[160];
        snprintf(msg, sizeof msg, "data mismatch at 0x%lx: got 0x%02x, expected 0x%02x",
                 off + i, temp[i], good[off + i]);
        fail(msg);
    }
}

static void write_all(long off, long len)
{
    long done = 0;
    while (done < len) {
        ssize_t n = pwrite(fd, good + off + done, (size_t)(len - done), off + done);
        if (n < 0)
            die("pwrite");
        done += n;
    }
}

static void do_op(int op, long off, long len)
{
    switch (op) {
    case OP_READ:
        if (file_size == 0)
            return;
        off %= file_size;
        if (off + len > file_size)
            len = file_size - off;
        check_range(off, len);
        break;
    case OP_WRITE:
        for (long i = 0; i < len; i++)
            good[off + i] = (unsigned char)(((opnum & 0xff) ^ (off + i)) | 1);
        write_all(off, len);
        if (off + len > file_size)
            file_size = off + len;
        break;
    case OP_TRUNCATE:
        if (ftruncate(fd, off) < 0)
            die("ftruncate");
        if (off > file_size)
            memset(good + file_size, 0, (size_t)(off - file_size));
        else
            memset(good + off, 0, (size_t)(file_size - off));
        file_size = off;
        break;
    case OP_FALLOCATE:
        if (fallocate(fd, 0, off, len) < 0)
            die("fallocate");
        if (off + len > file_size) {
            memset(good + file_size, 0, (size_t)(off + len - file_size));
            file_size = off + len;
        }
        break;
    case OP_PUNCH:
    case OP_ZERO: {
        int mode = op == OP_PUNCH ? FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
                                  : FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE;
        if (off >= file_size)
            return;
        if (off + len > file_size)
            len = file_size - off;
        if (fallocate(fd, mode, off, len) < 0)
            die(op_names[op]);
        memset(good + off, 0, (size_t)len);
        break;
    }
    case OP_FSYNC:
        if (fsync(fd) < 0)
            die("fsync");
        break;
    }
}

static void probe(void)
{
    /* Which optional operations does this file system do? (on the empty file) */
    for (int op = 0; op < OP_COUNT; op++)
        enabled[op] = 1;
    static const int modes[3] = {0, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                 FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE};
    static const int ops[3] = {OP_FALLOCATE, OP_PUNCH, OP_ZERO};
    for (int i = 0; i < 3; i++) {
        if (fallocate(fd, modes[i], 0, 4096) < 0) {
            if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL)
                die("probing fallocate");
            enabled[ops[i]] = 0;
            if (!quiet)
                fprintf(stderr, "fsxlite: %s not supported, left out\n", op_names[ops[i]]);
        }
    }
    if (ftruncate(fd, 0) < 0)
        die("ftruncate");
}

int main(int argc, char **argv)
{
    long numops = 10000, closeprob = 0, seed = 1;
    int c;
    while ((c = getopt(argc, argv, "N:S:l:o:c:qRW")) != -1) {
        switch (c) {
        case 'N': numops = atol(optarg); break;
        case 'S': seed = atol(optarg); break;
        case 'l': maxlen = atol(optarg); break;
        case 'o': maxoplen = atol(optarg); break;
        case 'c': closeprob = atol(optarg); break;
        case 'q': quiet = 1; break;
        case 'R': case 'W': break; /* fsx's "no mmap" flags: never mmap anyway */
        default:
            fprintf(stderr, "usage: fsxlite [-N numops] [-S seed] [-l maxlen] "
                            "[-o maxoplen] [-c closeprob] [-q] FILE\n");
            return 2;
        }
    }
    if (optind != argc - 1 || maxlen <= 0 || maxoplen <= 0 || numops < 0) {
        fprintf(stderr, "fsxlite: one FILE and positive sizes, please\n");
        return 2;
    }
    if (maxoplen > maxlen)
        maxoplen = maxlen;
    fname = argv[optind];
    rng_state = (uint64_t)seed * 0x9E3779B97F4A7C15ULL + 1;
    good = calloc((size_t)maxlen, 1);
    temp = malloc((size_t)maxlen);
    if (!good || !temp) {
        fprintf(stderr, "fsxlite: out of memory\n");
        return 2;
    }
    fd = open(fname, O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        die("create");
    probe();
    int total = 0;
    for (int op = 0; op < OP_COUNT; op++)
        total += enabled[op] ? op_weight[op] : 0;
    for (opnum = 0; opnum < numops;) {
        int pick = (int)(rnd() % (uint64_t)total), op = 0;
        for (; op < OP_COUNT; op++) {
            if (!enabled[op])
                continue;
            if (pick < op_weight[op])
                break;
            pick -= op_weight[op];
        }
        long off = (long)(rnd() % (uint64_t)maxlen);
        long len = (long)(rnd() % (uint64_t)maxoplen) + 1;
        if (op == OP_TRUNCATE)
            off = (long)(rnd() % (uint64_t)(maxlen + 1));
        if (op != OP_TRUNCATE && off + len > maxlen)
            len = maxlen - off;
        int k = (int)(opnum % LOG_SIZE);
        oplog[k].n = opnum;
        oplog[k].op = op;
        oplog[k].off = off;
        oplog[k].len = len;
        oplog[k].size_before = file_size;
        opnum++;
        do_op(op, off, len);
        if (op == OP_TRUNCATE)
            check_size();
        if (closeprob && rnd() % (uint64_t)closeprob == 0) {
            reopen();
            check_size();
        }
    }
    reopen();
    check_size();
    if (file_size)
        check_range(0, file_size);
    if (close(fd) < 0)
        die("close");
    if (!quiet)
        printf("fsxlite: %ld operations passed (seed %ld)\n", numops, seed);
    return 0;
}
