// SPDX-License-Identifier: GPL-2.0
/*
 * sidecall-tool: drives /dev/sidecall (sidecore.ko) from userspace.
 *
 *   sidecall-tool selftest      the module's selftest on every online CPU
 *   sidecall-tool bench [--iters N] [--warmup N]
 *                               null and CPUID latency, sidecall vs exit path
 *   sidecall-tool info          what the module sees on this CPU
 *
 * Built static (gcc -static -O2) so that an initramfs with busybox holds
 * everything it needs.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <sched.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "sidecall_uapi.h"

#define DEFAULT_ITERS 20000u
#define DEFAULT_WARMUP 2000u
/* Native: ~1 cycle per loop iteration. Emulated (QEMU TCG): a few ns. */
#define NATIVE_PROBE_ITERS 10000000ull
#define NATIVE_NS_PER_ITER 1.5

static void usage(FILE *f)
{
	fprintf(f,
		"usage: sidecall-tool selftest\n"
		"       sidecall-tool bench [--iters N] [--warmup N]   (defaults %u, %u)\n"
		"       sidecall-tool info\n"
		"Needs sidecore.ko loaded (/dev/sidecall).\n"
		"selftest: runs the module's selftest pinned to each online CPU and prints one\n"
		"  line, 'sidecall selftest: ok (...)' (exit 0) or 'sidecall selftest: FAILED (...)' (exit 1).\n"
		"bench: on the last online CPU, null and CPUID (leaf 0) by sidecall and by their\n"
		"  exit paths, in sidecore bench's table format. SIDECALL_NOT_REPRESENTATIVE=1 in\n"
		"  the environment marks the timing as not representative.\n",
		DEFAULT_ITERS, DEFAULT_WARMUP);
}

static int open_dev(void)
{
	int fd = open(SIDECALL_DEVICE, O_RDWR | O_CLOEXEC);

	if (fd < 0)
		fprintf(stderr,
			"sidecall-tool: cannot open %s: %s (is sidecore.ko loaded?)\n",
			SIDECALL_DEVICE, strerror(errno));
	return fd;
}

/* Online CPUs from /sys/devices/system/cpu/online ("0-3,6"); count or -1. */
static int online_cpus(int *cpus, int max, char *err, size_t errlen)
{
	const char *path = "/sys/devices/system/cpu/online";
	char buf[4096], *p, *end;
	int n = 0;
	FILE *f = fopen(path, "re");

	if (!f) {
		snprintf(err, errlen, "cannot read %s: %s", path, strerror(errno));
		return -1;
	}
	if (!fgets(buf, sizeof(buf), f)) {
		fclose(f);
		snprintf(err, errlen, "%s is empty", path);
		return -1;
	}
	fclose(f);
	p = buf;
	while (*p && *p != '\n') {
		long lo, hi;

		errno = 0;
		lo = strtol(p, &end, 10);
		if (end == p || errno || lo < 0)
			goto bad;
		hi = lo;
		p = end;
		if (*p == '-') {
			hi = strtol(p + 1, &end, 10);
			if (end == p + 1 || errno || hi < lo)
				goto bad;
			p = end;
		}
		for (; lo <= hi; lo++) {
			if (n == max || lo >= CPU_SETSIZE) {
				snprintf(err, errlen, "more CPUs in %s than %d",
					 path, max);
				return -1;
			}
			cpus[n++] = (int)lo;
		}
		if (*p == ',')
			p++;
		else if (*p && *p != '\n')
			goto bad;
	}
	if (n == 0) {
		snprintf(err, errlen, "%s lists no CPU", path);
		return -1;
	}
	return n;
bad:
	buf[strcspn(buf, "\n")] = '\0';
	snprintf(err, errlen, "cannot parse %s: '%.64s'", path, buf);
	return -1;
}

static int pin(int cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(cpu, &set);
	return sched_setaffinity(0, sizeof(set), &set);
}

/* ---- selftest ---- */

static __attribute__((format(printf, 1, 2))) int selftest_failed(const char *fmt, ...)
{
	va_list ap;

	fputs("sidecall selftest: FAILED (", stdout);
	va_start(ap, fmt);
	vprintf(fmt, ap);
	va_end(ap);
	fputs(")\n", stdout);
	return 1;
}

static int cmd_selftest(void)
{
	int cpus[CPU_SETSIZE], n, i, fd;
	unsigned long long checks = 0, by_sidecall = 0;
	char err[256];

	n = online_cpus(cpus, CPU_SETSIZE, err, sizeof(err));
	if (n < 0)
		return selftest_failed("%s", err);
	fd = open(SIDECALL_DEVICE, O_RDWR | O_CLOEXEC);
	if (fd < 0)
		return selftest_failed("cannot open %s: %s; is sidecore.ko loaded?",
				       SIDECALL_DEVICE, strerror(errno));
	for (i = 0; i < n; i++) {
		struct sidecall_selftest st;

		if (pin(cpus[i]))
			return selftest_failed("cannot pin to CPU %d: %s",
					       cpus[i], strerror(errno));
		memset(&st, 0, sizeof(st));
		if (ioctl(fd, SIDECALL_IOC_SELFTEST, &st))
			return selftest_failed("CPU %d: SELFTEST ioctl: %s",
					       cpus[i], strerror(errno));
		st.message[sizeof(st.message) - 1] = '\0';
		if ((int)st.cpu != cpus[i])
			return selftest_failed("pinned to CPU %d, ran on CPU %u",
					       cpus[i], st.cpu);
		if (st.failures)
			return selftest_failed("CPU %d (APIC ID %u): %s; %u of %u checks failed",
					       cpus[i], st.apic_id, st.message,
					       st.failures, st.checks);
		if (st.checks == 0)
			return selftest_failed("CPU %d: no check was made", cpus[i]);
		checks += st.checks;
		by_sidecall += st.by_sidecall;
	}
	close(fd);
	printf("sidecall selftest: ok (%llu checks on %d CPUs, sidecore %s)\n",
	       checks, n, by_sidecall ? "present" : "absent");
	return 0;
}

/* ---- bench ---- */

static inline uint64_t rdtsc(void)
{
	uint32_t lo, hi;

	__asm__ volatile("lfence; rdtsc; lfence" : "=a"(lo), "=d"(hi) :: "memory");
	return ((uint64_t)hi << 32) | lo;
}

/* ns per iteration of a register-only loop, from the TSC. */
static double native_probe(uint64_t tsc_khz)
{
	uint64_t n = NATIVE_PROBE_ITERS, t0, t1;

	t0 = rdtsc();
	__asm__ volatile("1: dec %0; jnz 1b" : "+r"(n) :: "cc");
	t1 = rdtsc();
	return (double)(t1 - t0) * 1e6 / (double)tsc_khz / NATIVE_PROBE_ITERS;
}

/* The hypervisor's CPUID signature, if the CPU says there is one. */
static void hypervisor_signature(char sig[13])
{
	uint32_t a, b, c, d;

	sig[0] = '\0';
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "0"(1), "2"(0));
	if (!(c & (1u << 31)))
		return;
	__asm__ volatile("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "0"(0x40000000), "2"(0));
	memcpy(sig, &b, 4);
	memcpy(sig + 4, &c, 4);
	memcpy(sig + 8, &d, 4);
	sig[12] = '\0';
}

struct row {
	const char *op;
	const char *path;
	uint32_t bench_op;
	uint32_t bench_path;
	uint64_t *samples;
	uint64_t fallbacks;
	uint64_t p50, p90, p99, p999, max;
};

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return (x > y) - (x < y);
}

/* Nearest rank of @permille in sorted @s: the smallest value with at least
 * that fraction of the samples at or below it. */
static uint64_t quantile(const uint64_t *s, uint32_t n, unsigned int permille)
{
	uint64_t rank = ((uint64_t)n * permille + 999) / 1000;

	if (rank < 1)
		rank = 1;
	return s[rank - 1];
}

static double to_ns(uint64_t cycles, uint64_t tsc_khz)
{
	return (double)cycles * 1e6 / (double)tsc_khz;
}

/* A decimal count in @min..SIDECALL_BENCH_MAX_ITERS for option @opt. */
static int parse_count(const char *opt, const char *s, uint32_t min, uint32_t *out)
{
	char *end;
	unsigned long v;

	if (!s) {
		fprintf(stderr, "sidecall-tool: %s wants a number\n", opt);
		return -1;
	}
	errno = 0;
	v = strtoul(s, &end, 10);
	if (!*s || *end || *s == '-' || errno || v < min ||
	    v > SIDECALL_BENCH_MAX_ITERS) {
		fprintf(stderr, "sidecall-tool: %s wants a number in %u..%u, not '%s'\n",
			opt, min, SIDECALL_BENCH_MAX_ITERS, s);
		return -1;
	}
	*out = (uint32_t)v;
	return 0;
}

static int cmd_bench(int argc, char **argv)
{
	struct row rows[] = {
		{ .op = "null", .path = "sidecall", .bench_op = SIDECALL_BENCH_NULL, .bench_path = SIDECALL_PATH_SIDECALL },
		{ .op = "null", .path = "hypercall", .bench_op = SIDECALL_BENCH_NULL, .bench_path = SIDECALL_PATH_HYPERCALL },
		{ .op = "cpuid", .path = "sidecall", .bench_op = SIDECALL_BENCH_CPUID, .bench_path = SIDECALL_PATH_SIDECALL },
		{ .op = "cpuid", .path = "cpuid", .bench_op = SIDECALL_BENCH_CPUID, .bench_path = SIDECALL_PATH_CPUID_INSN },
	};
	const size_t nrows = sizeof(rows) / sizeof(rows[0]);
	uint32_t iters = DEFAULT_ITERS, warmup = DEFAULT_WARMUP;
	int cpus[CPU_SETSIZE], n, fd, cpu, i, ret = 1;
	struct sidecall_info info;
	char err[256], sig[13], why[200];
	const char *env;
	double probe;
	size_t r;

	for (i = 0; i < argc; i++) {
		const char *val = i + 1 < argc ? argv[i + 1] : NULL;

		if (!strcmp(argv[i], "--iters")) {
			if (parse_count("--iters", val, 1, &iters))
				return 2;
			i++;
		} else if (!strcmp(argv[i], "--warmup")) {
			if (parse_count("--warmup", val, 0, &warmup))
				return 2;
			i++;
		} else {
			fprintf(stderr, "sidecall-tool: bench: unknown argument '%s'\n", argv[i]);
			usage(stderr);
			return 2;
		}
	}

	n = online_cpus(cpus, CPU_SETSIZE, err, sizeof(err));
	if (n < 0) {
		fprintf(stderr, "sidecall-tool: %s\n", err);
		return 1;
	}
	cpu = cpus[n - 1];
	if (pin(cpu)) {
		fprintf(stderr, "sidecall-tool: cannot pin to CPU %d: %s\n", cpu, strerror(errno));
		return 1;
	}
	fd = open_dev();
	if (fd < 0)
		return 1;
	if (ioctl(fd, SIDECALL_IOC_INFO, &info)) {
		fprintf(stderr, "sidecall-tool: INFO ioctl: %s\n", strerror(errno));
		goto out;
	}
	if (info.tsc_khz == 0) {
		fprintf(stderr, "sidecall-tool: the module reports no TSC frequency\n");
		goto out;
	}

	why[0] = '\0';
	probe = native_probe(info.tsc_khz);
	hypervisor_signature(sig);
	env = getenv("SIDECALL_NOT_REPRESENTATIVE");
	if (env && *env && strcmp(env, "0"))
		snprintf(why, sizeof(why), "SIDECALL_NOT_REPRESENTATIVE=%s", env);
	else if (!strcmp(sig, "TCGTCGTCGTCG"))
		snprintf(why, sizeof(why), "the CPU is emulated by QEMU TCG");
	else if (probe >= NATIVE_NS_PER_ITER)
		snprintf(why, sizeof(why),
			 "a register-only loop takes %.2f ns per iteration: instructions are emulated (nested under TCG?)",
			 probe);

	for (r = 0; r < nrows; r++) {
		struct sidecall_bench b;

		rows[r].samples = calloc(iters, sizeof(uint64_t));
		if (!rows[r].samples) {
			fprintf(stderr, "sidecall-tool: out of memory for %u samples\n", iters);
			goto out;
		}
		memset(&b, 0, sizeof(b));
		b.op = rows[r].bench_op;
		b.path = rows[r].bench_path;
		b.iters = iters;
		b.warmup = warmup;
		b.samples = (uintptr_t)rows[r].samples;
		if (ioctl(fd, SIDECALL_IOC_BENCH, &b)) {
			fprintf(stderr, "sidecall-tool: bench %s/%s: BENCH ioctl: %s\n",
				rows[r].op, rows[r].path, strerror(errno));
			goto out;
		}
		if ((int)b.cpu != cpu) {
			fprintf(stderr, "sidecall-tool: bench %s/%s ran on CPU %u, pinned to %d\n",
				rows[r].op, rows[r].path, b.cpu, cpu);
			goto out;
		}
		rows[r].fallbacks = b.fallbacks;
		qsort(rows[r].samples, iters, sizeof(uint64_t), cmp_u64);
		rows[r].p50 = quantile(rows[r].samples, iters, 500);
		rows[r].p90 = quantile(rows[r].samples, iters, 900);
		rows[r].p99 = quantile(rows[r].samples, iters, 990);
		rows[r].p999 = quantile(rows[r].samples, iters, 999);
		rows[r].max = rows[r].samples[iters - 1];
	}

	printf("sidecall bench — Linux guest on CPU %d (APIC ID %u), TSC %llu kHz (%.3f GHz), sidecore %s%s%s\n",
	       cpu, info.apic_id, (unsigned long long)info.tsc_khz,
	       (double)info.tsc_khz / 1e6,
	       info.served ? "serving this CPU's ring" : "absent (exit paths only)",
	       why[0] ? "; timing not representative: " : "", why);
	printf("\n%-18s %-17s %9s %9s %9s %9s %10s %9s %8s %9s\n",
	       "op", "path", "p50 ns", "p90 ns", "p99 ns", "p99.9 ns", "max ns",
	       "p50 cyc", "samples", "fallback");
	for (r = 0; r < nrows; r++) {
		const struct row *w = &rows[r];

		printf("%-18s %-17s %9.0f %9.0f %9.0f %9.0f %10.0f %9llu %8u %9llu\n",
		       w->op, w->path, to_ns(w->p50, info.tsc_khz),
		       to_ns(w->p90, info.tsc_khz), to_ns(w->p99, info.tsc_khz),
		       to_ns(w->p999, info.tsc_khz), to_ns(w->max, info.tsc_khz),
		       (unsigned long long)w->p50, iters,
		       (unsigned long long)w->fallbacks);
	}
	printf("\nratios of medians, same run (x/sidecall = sidecall speed-up):\n");
	for (r = 0; r < nrows; r++) {
		const struct row *side = &rows[r];
		size_t o;

		if (strcmp(side->path, "sidecall") || side->p50 == 0)
			continue;
		for (o = 0; o < nrows; o++) {
			if (o == r || strcmp(rows[o].op, side->op))
				continue;
			printf("  %-6s %s/sidecall %.2f\n", side->op, rows[o].path,
			       (double)rows[o].p50 / (double)side->p50);
		}
	}
	ret = 0;
out:
	for (r = 0; r < nrows; r++)
		free(rows[r].samples);
	close(fd);
	return ret;
}

/* ---- info ---- */

static int cmd_info(void)
{
	static const char *const names[SIDECALL_NR_COUNTERS] = {
		"sidecalls", "fallbacks", "late_replies", "probes",
		"paused_exits", "abandoned", "exit_calls", "lost",
	};
	struct sidecall_info info;
	int fd = open_dev(), i;

	if (fd < 0)
		return 1;
	if (ioctl(fd, SIDECALL_IOC_INFO, &info)) {
		fprintf(stderr, "sidecall-tool: INFO ioctl: %s\n", strerror(errno));
		close(fd);
		return 1;
	}
	close(fd);
	printf("region       %#llx+%#llx, %u vCPU blocks, features %#llx\n",
	       (unsigned long long)info.region_gpa,
	       (unsigned long long)info.region_size, info.nr_vcpus,
	       (unsigned long long)info.features);
	printf("tsc          %llu kHz, reply bound %llu cycles\n",
	       (unsigned long long)info.tsc_khz,
	       (unsigned long long)info.reply_bound);
	printf("this cpu     %u, APIC ID %u, ring %s, sidecore %s%s\n", info.cpu,
	       info.apic_id, info.has_ring ? "yes" : "no",
	       info.served ? "serving" : "not serving (lost or paused)",
	       info.absent ? ", client backing off" : "");
	for (i = 0; i < SIDECALL_NR_COUNTERS; i++)
		printf("%-12s %llu\n", names[i],
		       (unsigned long long)info.counters[i]);
	return 0;
}

int main(int argc, char **argv)
{
	/* The console may be a pipe: keep lines whole and in order. */
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc < 2) {
		usage(stderr);
		return 2;
	}
	if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") ||
	    !strcmp(argv[1], "help")) {
		usage(stdout);
		return 0;
	}
	if (!strcmp(argv[1], "selftest") && argc == 2)
		return cmd_selftest();
	if (!strcmp(argv[1], "bench"))
		return cmd_bench(argc - 2, argv + 2);
	if (!strcmp(argv[1], "info") && argc == 2)
		return cmd_info();
	fprintf(stderr, "sidecall-tool: unknown command '%s'\n", argv[1]);
	usage(stderr);
	return 2;
}
