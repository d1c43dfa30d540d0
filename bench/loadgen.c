/*
 * loadgen: send a prepared corpus of StatsD datagrams over UDP at a paced rate.
 *
 * The corpus file is a run of records, each a 4-byte little-endian length
 * followed by that many bytes (one datagram). The runner (bench/run.py)
 * builds it, so the content of every datagram is known in advance; this
 * program only sends it, cycling from the first record, with sendmmsg(2) on
 * a connected socket.
 *
 * Consecutive records of the same length (as many as one paced chunk holds,
 * at most MAX_SEGMENTS) go out as one UDP GSO message (UDP_SEGMENT, Linux
 * 4.18+): the kernel cuts it into the same datagrams the receiver would
 * otherwise get one by one, but walks the send path once. On one-line workloads that path, not the
 * receiver, was the limit: about 290k datagrams a second on a core here,
 * against 1.5M+ with GSO. Where the kernel refuses UDP_SEGMENT, every
 * record is its own message.
 *
 *   loadgen CORPUS HOST PORT RATE DURATION [BATCH]
 *
 * RATE is datagrams per second (0 = as fast as possible), DURATION seconds.
 * Pacing: at elapsed time t, the number of datagrams due is RATE * t; the
 * sender sends what is due in batches of at most BATCH and sleeps when it is
 * ahead. It stops after DURATION seconds whatever happens.
 *
 * On exit it prints one JSON object on stdout:
 *   {"sent": datagrams, "elapsed": seconds, "errors": n, "calls": n,
 *    "records": corpus records, "messages": sends a cycle of them takes}
 * `sent` counts datagrams the kernel accepted; the records sent are exactly
 * records 0..sent-1 of the corpus, modulo its length.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/udp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#define MAX_BATCH 1024
#define QUANTUM 0.0002
/* datagrams in one GSO message: the kernel's limit (UDP_MAX_SEGMENTS) is
 * 64 on older kernels and 128 on newer ones; 64 works on both */
#define MAX_SEGMENTS 64
#define MAX_GSO_BYTES 65000
#ifndef UDP_SEGMENT
#define UDP_SEGMENT 103
#endif

static double now_seconds(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static uint32_t record_length(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static unsigned char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f) {
        perror(path);
        return NULL;
    }
    struct stat st;
    if (fstat(fileno(f), &st) != 0 || st.st_size <= 0) {
        fprintf(stderr, "%s: empty or unreadable\n", path);
        fclose(f);
        return NULL;
    }
    unsigned char *buf = malloc((size_t)st.st_size);
    if (!buf || fread(buf, 1, (size_t)st.st_size, f) != (size_t)st.st_size) {
        fprintf(stderr, "%s: read failed\n", path);
        fclose(f);
        free(buf);
        return NULL;
    }
    fclose(f);
    *size = (size_t)st.st_size;
    return buf;
}

int main(int argc, char **argv)
{
    if (argc < 6) {
        fprintf(stderr, "usage: %s CORPUS HOST PORT RATE DURATION [BATCH]\n", argv[0]);
        return 2;
    }
    const char *corpus_path = argv[1];
    const char *host = argv[2];
    int port = atoi(argv[3]);
    double rate = atof(argv[4]);
    double duration = atof(argv[5]);
    int batch = argc > 6 ? atoi(argv[6]) : 64;
    if (batch < 1 || batch > MAX_BATCH || port <= 0 || port > 65535 || duration <= 0
        || duration > 3600 || rate < 0) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }

    size_t size = 0;
    unsigned char *data = read_file(corpus_path, &size);
    if (!data)
        return 1;

    /* First pass: count records. */
    size_t count = 0;
    for (size_t off = 0; off + 4 <= size;) {
        uint32_t len = record_length(data + off);
        if (off + 4 + len > size) {
            fprintf(stderr, "corpus truncated at byte %zu\n", off);
            return 1;
        }
        off += 4 + len;
        count++;
    }
    if (count == 0) {
        fprintf(stderr, "corpus has no records\n");
        return 1;
    }

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    if (fd < 0) {
        perror("socket");
        return 1;
    }
    int sndbuf = 4 * 1024 * 1024;
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    struct sockaddr_in addr;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) {
        fprintf(stderr, "bad IPv4 address %s\n", host);
        return 2;
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) != 0) {
        perror("connect");
        return 1;
    }
    /* Setting a GSO size on the socket is how to ask whether the kernel
     * has UDP_SEGMENT; each message then carries its own size. */
    int probe = 1000;
    int gso = setsockopt(fd, SOL_UDP, UDP_SEGMENT, &probe, sizeof probe) == 0;
    probe = 0;
    if (gso)
        setsockopt(fd, SOL_UDP, UDP_SEGMENT, &probe, sizeof probe);

    /* Send in chunks of what falls due in QUANTUM seconds (at least one
     * datagram, at most a batch): one syscall per datagram at high rates
     * would make the sender, not the receiver, the bottleneck. */
    double chunk = rate > 0 ? rate * QUANTUM : (double)batch; /* 0: flat out, in batches */
    if (chunk < 1.0)
        chunk = 1.0;
    if (chunk > (double)batch)
        chunk = (double)batch;
    /* A GSO message holds at most a chunk: the datagrams reach the receiver
     * in the same bursts as they would one by one. */
    size_t max_run = (size_t)chunk < MAX_SEGMENTS ? (size_t)chunk : MAX_SEGMENTS;

    /* Second pass: the payloads side by side (one GSO message must be one
     * contiguous run of equal segments), then one message per run of
     * equal-length records. */
    unsigned char *payload = malloc(size);
    struct iovec *iov = calloc(count, sizeof *iov);
    struct mmsghdr *msgs = calloc(count, sizeof *msgs);
    uint32_t *segments = calloc(count, sizeof *segments);
    char(*control)[CMSG_SPACE(sizeof(uint16_t))] = calloc(count, sizeof *control);
    uint32_t *lengths = calloc(count, sizeof *lengths);
    unsigned char **starts = calloc(count, sizeof *starts);
    if (!payload || !iov || !msgs || !segments || !control || !lengths || !starts) {
        fprintf(stderr, "out of memory\n");
        return 1;
    }
    unsigned char *end = payload;
    for (size_t i = 0, off = 0; i < count; i++) {
        lengths[i] = record_length(data + off);
        memcpy(end, data + off + 4, lengths[i]);
        starts[i] = end;
        end += lengths[i];
        off += 4 + lengths[i];
    }
    size_t messages = 0;
    for (size_t i = 0; i < count;) {
        size_t run = 1;
        while (gso && i + run < count && lengths[i + run] == lengths[i] && run < max_run
               && (run + 1) * lengths[i] <= MAX_GSO_BYTES)
            run++;
        struct msghdr *hdr = &msgs[messages].msg_hdr;
        iov[messages].iov_base = starts[i];
        iov[messages].iov_len = lengths[i] * run;
        hdr->msg_iov = &iov[messages];
        hdr->msg_iovlen = 1;
        if (run > 1) {
            hdr->msg_control = control[messages];
            hdr->msg_controllen = sizeof control[messages];
            struct cmsghdr *cm = CMSG_FIRSTHDR(hdr);
            cm->cmsg_level = SOL_UDP;
            cm->cmsg_type = UDP_SEGMENT;
            cm->cmsg_len = CMSG_LEN(sizeof(uint16_t));
            uint16_t segment = (uint16_t)lengths[i];
            memcpy(CMSG_DATA(cm), &segment, sizeof segment);
        }
        segments[messages++] = (uint32_t)run;
        i += run;
    }
    free(lengths);
    free(starts);

    uint64_t sent = 0, errors = 0, calls = 0;
    size_t next = 0; /* index of the next message to send */
    double start = now_seconds();
    double elapsed = 0.0;
    for (;;) {
        elapsed = now_seconds() - start;
        if (elapsed >= duration)
            break;
        uint64_t want = batch;
        if (rate > 0) {
            double due = rate * elapsed - (double)sent;
            if (due < chunk) {
                /* Ahead of schedule: sleep until a chunk is due, in short
                 * naps so the deadline check stays fresh. */
                double wait = (chunk - due) / rate;
                if (wait > 0.002)
                    wait = 0.002;
                if (wait > 0.00005) {
                    struct timespec ts = {0, (long)(wait * 1e9)};
                    nanosleep(&ts, NULL);
                }
                continue;
            }
            if (due < (double)want)
                want = (uint64_t)due;
        }
        /* whole messages from `next`, at least one, at most `want` datagrams
         * in all, and not past the corpus' end */
        unsigned int take = 0;
        uint64_t datagrams = 0;
        while (next + take < messages && take < MAX_BATCH
               && (take == 0 || datagrams + segments[next + take] <= want))
            datagrams += segments[next + take++];
        int n = sendmmsg(fd, &msgs[next], take, 0);
        calls++;
        if (n < 0) {
            /* ECONNREFUSED (nobody listening yet), ENOBUFS, EAGAIN: count,
             * skip nothing, and retry after the pacing check. */
            errors++;
            if (errno != ECONNREFUSED && errno != ENOBUFS && errno != EAGAIN
                && errno != EINTR) {
                perror("sendmmsg");
                break;
            }
            continue;
        }
        for (int k = 0; k < n; k++)
            sent += segments[next + (size_t)k];
        next += (size_t)n;
        if (next == messages)
            next = 0;
    }
    printf("{\"sent\": %llu, \"elapsed\": %.6f, \"errors\": %llu, \"calls\": %llu, "
           "\"records\": %zu, \"messages\": %zu}\n",
           (unsigned long long)sent, elapsed, (unsigned long long)errors,
           (unsigned long long)calls, count, messages);
    close(fd);
    free(control);
    free(segments);
    free(msgs);
    free(iov);
    free(payload);
    free(data);
    return 0;
}
