// Metal Shading Language built-ins for running MLX-generated kernel source as C++
// on a CPU, so that kernels written for Apple GPUs can be tested on Linux.
//
// Execution model: threadgroups run one at a time, in random order. Every GPU
// thread of a threadgroup is a cooperative fiber (ucontext). A fiber runs until it
// reaches a synchronisation point (any simd_* collective, simdgroup matrix load or
// store, or barrier) and then yields; the scheduler resumes released fibers in a
// random order (see run_threadgroup for its two schedules). Collectives therefore
// see all live lanes of the simdgroup in lockstep, and a missing barrier shows up
// as a wrong result because writers and readers interleave.
//
// Threadgroup memory: `threadgroup T name[N];` becomes a function-local static,
// shared by all fibers; as threadgroups run one at a time, that is exactly the
// Metal scope. It is filled with NaN bytes before every threadgroup (see
// poison_threadgroup_memory), so a read before a write shows. Pointers into
// threadgroup memory must be declared without the `threadgroup` qualifier (it
// would make the pointer itself static).
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <type_traits>
#include <vector>

// ---------------------------------------------------------------- scalar types
using half = _Float16;
using float16_t = _Float16;

struct bfloat16_t {
  uint16_t bits;
  bfloat16_t() = default;
  bfloat16_t(float value) {  // round to nearest even, NaN kept quiet
    uint32_t u;
    std::memcpy(&u, &value, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = uint16_t((u >> 16) | 0x40u);
    } else {
      bits = uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
  }
  operator float() const volatile {  // volatile: see `constant` at the end
    uint32_t u = uint32_t(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
};
using bfloat = bfloat16_t;
using uint = unsigned int;
using ushort = unsigned short;
using uchar = unsigned char;
using ulong = unsigned long;

// ---------------------------------------------------------------- vector types
namespace msl_emu {
template <typename T, int N>
struct vec_storage;
template <typename T>
struct vec_storage<T, 2> { T x, y; };
template <typename T>
struct vec_storage<T, 3> { T x, y, z; };
template <typename T>
struct vec_storage<T, 4> { T x, y, z, w; };

template <typename T, int N>
struct vec : vec_storage<T, N> {
  vec() = default;
  vec(T s) { for (int i = 0; i < N; ++i) (*this)[i] = s; }
  template <typename... A, typename = std::enable_if_t<sizeof...(A) == N>>
  vec(A... a) {
    T values[N] = {T(a)...};
    for (int i = 0; i < N; ++i) (*this)[i] = values[i];
  }
  T& operator[](int i) { return reinterpret_cast<T*>(this)[i]; }
  const T& operator[](int i) const { return reinterpret_cast<const T*>(this)[i]; }
};

#define MSL_EMU_VEC_OP(op)                                                    \
  template <typename T, int N>                                                \
  vec<T, N> operator op(vec<T, N> a, const vec<T, N>& b) {                    \
    for (int i = 0; i < N; ++i) a[i] = a[i] op b[i];                          \
    return a;                                                                 \
  }                                                                           \
  template <typename T, int N>                                                \
  vec<T, N> operator op(vec<T, N> a, T b) { return a op vec<T, N>(b); }       \
  template <typename T, int N>                                                \
  vec<T, N> operator op(T a, const vec<T, N>& b) { return vec<T, N>(a) op b; }
MSL_EMU_VEC_OP(+)
MSL_EMU_VEC_OP(-)
MSL_EMU_VEC_OP(*)
MSL_EMU_VEC_OP(/)
#undef MSL_EMU_VEC_OP
}  // namespace msl_emu

using uint2 = msl_emu::vec<uint, 2>;
using uint3 = msl_emu::vec<uint, 3>;
using uint4 = msl_emu::vec<uint, 4>;
using int2 = msl_emu::vec<int, 2>;
using int3 = msl_emu::vec<int, 3>;
using int4 = msl_emu::vec<int, 4>;
using ulong2 = msl_emu::vec<ulong, 2>;
using float2 = msl_emu::vec<float, 2>;
using float3 = msl_emu::vec<float, 3>;
using float4 = msl_emu::vec<float, 4>;
using half2 = msl_emu::vec<half, 2>;
using half4 = msl_emu::vec<half, 4>;

// ---------------------------------------------------------------- the scheduler
// Threadgroup arrays are the kernel's function-local statics. The driver finds
// them in the binary's symbol table and sends their places, relative to this
// anchor, with each launch; they are poisoned before every threadgroup, since
// Metal leaves threadgroup memory uninitialised.
extern "C" {
char msl_emu_anchor;
}

namespace msl_emu {

struct MemoryRange {
  int64_t offset_from_anchor;
  uint64_t bytes;
};

inline std::vector<MemoryRange>& threadgroup_memory() {
  static std::vector<MemoryRange> ranges;
  return ranges;
}

inline void poison_threadgroup_memory() {
  for (const MemoryRange& m : threadgroup_memory())
    std::memset(reinterpret_cast<void*>(reinterpret_cast<intptr_t>(&msl_emu_anchor) + m.offset_from_anchor),
                0xff, m.bytes);
}

struct Barrier {
  unsigned arrived = 0;
  unsigned live = 0;  // threads that have not returned yet
  unsigned long generation = 0;
};

constexpr int kSimdWidth = 32;
constexpr size_t kSlotBytes = 64;
constexpr size_t kFiberStackBytes = 64 * 1024;

struct SimdGroup {
  Barrier barrier;
  unsigned char slots[2][kSimdWidth][kSlotBytes];
  unsigned long slot_generation[2][kSimdWidth];
};

struct ThreadInfo {
  uint3 thread_position_in_grid, thread_position_in_threadgroup,
      threadgroup_position_in_grid, threads_per_threadgroup,
      threadgroups_per_grid, grid_size;
  uint thread_index_in_threadgroup, thread_index_in_simdgroup,
      simdgroup_index_in_threadgroup, threads_per_simdgroup,
      simdgroups_per_threadgroup;
};

struct Fiber {
  ThreadInfo info;
  ucontext_t context;
  std::vector<char> stack;
  const unsigned long* wait_generation = nullptr;
  unsigned long wait_value = 0;
  bool done = false;
};

struct Runtime {
  std::vector<Fiber> fibers;
  std::vector<SimdGroup> simdgroups;
  Barrier threadgroup_barrier;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  void (*kernel_thread)(const ThreadInfo&) = nullptr;
  std::mt19937_64 rng;
};

inline Runtime& runtime() {
  static Runtime r;
  return r;
}

[[noreturn]] inline void fail(const char* message) {
  std::fprintf(stderr, "msl_emu: %s\n", message);
  std::exit(3);
}

inline void yield_to_scheduler() {
  Runtime& r = runtime();
  swapcontext(&r.current->context, &r.scheduler);
}

// Arrive at `b` and sleep until every live thread of its scope has arrived.
inline void arrive_and_wait(Barrier& b) {
  Fiber* self = runtime().current;
  unsigned long my_generation = b.generation;
  if (++b.arrived == b.live) {
    b.arrived = 0;
    ++b.generation;
  }
  self->wait_generation = &b.generation;
  self->wait_value = my_generation;
  yield_to_scheduler();
}

// A thread that returns leaves its scopes; waiting peers may now be complete.
inline void leave(Barrier& b) {
  --b.live;
  if (b.arrived > 0 && b.arrived == b.live) {
    b.arrived = 0;
    ++b.generation;
  }
}

inline void fiber_entry() {
  Runtime& r = runtime();
  Fiber* self = r.current;
  r.kernel_thread(self->info);
  self->done = true;
  leave(r.simdgroups[self->info.simdgroup_index_in_threadgroup].barrier);
  leave(r.threadgroup_barrier);
  swapcontext(&self->context, &r.scheduler);
}

inline bool runnable(const Fiber& f) {
  return !f.done && (f.wait_generation == nullptr || *f.wait_generation != f.wait_value);
}

// Runs one threadgroup to completion.
inline void run_threadgroup(const uint3& group, const uint3& group_size,
                            const uint3& groups, const uint3& grid) {
  Runtime& r = runtime();
  uint3 extent;  // the edge threadgroup of a non-uniform grid is smaller
  for (int d = 0; d < 3; ++d)
    extent[d] = std::min(group_size[d], grid[d] - group[d] * group_size[d]);
  unsigned count = extent.x * extent.y * extent.z;
  unsigned simd_count = (count + kSimdWidth - 1) / kSimdWidth;
  r.fibers.resize(count);
  r.simdgroups.assign(simd_count, SimdGroup{});
  for (SimdGroup& g : r.simdgroups)
    std::fill(&g.slot_generation[0][0], &g.slot_generation[0][0] + 2 * kSimdWidth, ~0ul);
  r.threadgroup_barrier = Barrier{};
  r.threadgroup_barrier.live = count;
  poison_threadgroup_memory();
  for (unsigned i = 0; i < count; ++i) {
    Fiber& f = r.fibers[i];
    ThreadInfo& t = f.info;
    t.thread_position_in_threadgroup =
        uint3(i % extent.x, (i / extent.x) % extent.y, i / (extent.x * extent.y));
    for (int d = 0; d < 3; ++d)
      t.thread_position_in_grid[d] = group[d] * group_size[d] + t.thread_position_in_threadgroup[d];
    t.threadgroup_position_in_grid = group;
    t.threads_per_threadgroup = extent;
    t.threadgroups_per_grid = groups;
    t.grid_size = grid;
    t.thread_index_in_threadgroup = i;
    t.thread_index_in_simdgroup = i % kSimdWidth;
    t.simdgroup_index_in_threadgroup = i / kSimdWidth;
    t.threads_per_simdgroup = kSimdWidth;
    t.simdgroups_per_threadgroup = simd_count;
    r.simdgroups[i / kSimdWidth].barrier.live++;
    f.done = false;
    f.wait_generation = nullptr;
    f.stack.resize(kFiberStackBytes);
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, fiber_entry, 0);
  }
  // Half the threadgroups run fairly (every released thread once per round, in a
  // random order); the other half greedily: the simdgroup first in a random
  // ranking, redrawn at every threadgroup barrier, runs as far as it can before any
  // other moves. Greedy runs turn a missing threadgroup barrier into a stale read.
  const bool greedy = r.rng() & 1u;
  std::vector<unsigned> rank(simd_count);
  for (unsigned i = 0; i < simd_count; ++i) rank[i] = i;
  unsigned long ranked_epoch = ~0ul;
  std::vector<unsigned> order;
  for (;;) {
    if (greedy && ranked_epoch != r.threadgroup_barrier.generation) {
      std::shuffle(rank.begin(), rank.end(), r.rng);
      ranked_epoch = r.threadgroup_barrier.generation;
    }
    order.clear();
    bool all_done = true;
    unsigned best_rank = simd_count;
    for (unsigned i = 0; i < count; ++i) {
      all_done &= r.fibers[i].done;
      if (!runnable(r.fibers[i])) continue;
      unsigned fiber_rank = greedy ? rank[i / kSimdWidth] : 0;
      if (fiber_rank < best_rank) {
        best_rank = fiber_rank;
        order.clear();
      }
      if (fiber_rank == best_rank) order.push_back(i);
    }
    if (all_done) return;
    if (order.empty()) fail("deadlock: threads wait at different barriers or collectives");
    std::shuffle(order.begin(), order.end(), r.rng);
    for (unsigned i : order) {
      Fiber& f = r.fibers[i];
      if (!runnable(f)) continue;
      f.wait_generation = nullptr;
      r.current = &f;
      swapcontext(&r.scheduler, &f.context);
    }
  }
}

// Every lane publishes `value`; after the exchange `lane_value(i)` reads lane i's.
// Slots are double-buffered by the collective's generation parity: a lane can be
// at most one collective ahead of the slowest reader of the previous one.
template <typename T>
struct Exchange {
  static_assert(sizeof(T) <= kSlotBytes, "simd value too large");
  SimdGroup* group;
  unsigned long generation;
  explicit Exchange(const T& value) {
    Runtime& r = runtime();
    Fiber* self = r.current;
    group = &r.simdgroups[self->info.simdgroup_index_in_threadgroup];
    generation = group->barrier.generation;
    unsigned lane = self->info.thread_index_in_simdgroup;
    std::memcpy(group->slots[generation & 1][lane], &value, sizeof(T));
    group->slot_generation[generation & 1][lane] = generation;
    arrive_and_wait(group->barrier);
  }
  bool live(unsigned i) const {
    return i < kSimdWidth && group->slot_generation[generation & 1][i] == generation;
  }
  T lane_value(unsigned i) const {
    T v;
    if (!live(i)) {  // reading an absent lane is undefined on the GPU: poison it
      std::memset(&v, 0xff, sizeof(T));
      return v;
    }
    std::memcpy(&v, group->slots[generation & 1][i], sizeof(T));
    return v;
  }
};

}  // namespace msl_emu

// ---------------------------------------------------------------- the launcher
namespace msl_emu {

inline std::vector<std::vector<char>>& buffers() {
  static std::vector<std::vector<char>> b;
  return b;
}
inline void* buffer(unsigned i) { return buffers().at(i).data(); }

template <typename T>
inline T read_value(FILE* f) {
  T v;
  if (std::fread(&v, sizeof(T), 1, f) != 1) fail("truncated launch file");
  return v;
}

// Launch file: grid[3], threadgroup[3] (uint32), seed (uint64), threadgroup
// array count (uint32) and per array its offset from msl_emu_anchor (int64) and
// byte count (uint64), buffer count (uint32), then per buffer its byte count
// (uint64) and bytes. The result file holds every buffer again, in the same
// layout, after the grid has run.
inline int run_main(int argc, char** argv, void (*kernel_thread)(const ThreadInfo&)) {
  if (argc != 3) fail("usage: kernel LAUNCH_FILE RESULT_FILE");
  FILE* in = std::fopen(argv[1], "rb");
  if (!in) fail("cannot open launch file");
  uint3 grid, group_size;
  for (int d = 0; d < 3; ++d) grid[d] = read_value<uint32_t>(in);
  for (int d = 0; d < 3; ++d) group_size[d] = read_value<uint32_t>(in);
  uint64_t seed = read_value<uint64_t>(in);
  threadgroup_memory().resize(read_value<uint32_t>(in));
  for (MemoryRange& m : threadgroup_memory()) {
    m.offset_from_anchor = read_value<int64_t>(in);
    m.bytes = read_value<uint64_t>(in);
  }
  uint32_t count = read_value<uint32_t>(in);
  buffers().resize(count);
  for (auto& b : buffers()) {
    b.resize(read_value<uint64_t>(in));
    if (!b.empty() && std::fread(b.data(), 1, b.size(), in) != b.size()) fail("truncated buffer");
  }
  std::fclose(in);

  Runtime& r = runtime();
  r.kernel_thread = kernel_thread;
  r.rng.seed(seed);
  uint3 groups;
  for (int d = 0; d < 3; ++d) groups[d] = (grid[d] + group_size[d] - 1) / group_size[d];
  std::vector<uint3> order;
  for (uint z = 0; z < groups.z; ++z)
    for (uint y = 0; y < groups.y; ++y)
      for (uint x = 0; x < groups.x; ++x) order.push_back(uint3(x, y, z));
  std::shuffle(order.begin(), order.end(), r.rng);  // no threadgroup order is promised
  for (const uint3& g : order) run_threadgroup(g, group_size, groups, grid);

  FILE* out = std::fopen(argv[2], "wb");
  if (!out) fail("cannot open result file");
  for (auto& b : buffers()) {
    uint64_t n = b.size();
    std::fwrite(&n, sizeof n, 1, out);
    std::fwrite(b.data(), 1, b.size(), out);
  }
  std::fclose(out);
  return 0;
}

}  // namespace msl_emu

// ---------------------------------------------------------------- metal:: library
namespace metal {

enum class mem_flags { mem_none = 0, mem_device = 1, mem_threadgroup = 2, mem_texture = 4 };

inline void threadgroup_barrier(mem_flags) {
  msl_emu::arrive_and_wait(msl_emu::runtime().threadgroup_barrier);
}
inline void simdgroup_barrier(mem_flags) {
  msl_emu::Runtime& r = msl_emu::runtime();
  msl_emu::arrive_and_wait(r.simdgroups[r.current->info.simdgroup_index_in_threadgroup].barrier);
}

// Half and bfloat math runs in float, as the GPU's does for these functions.
template <typename T>
using math_t = std::conditional_t<std::is_floating_point_v<T>, T, float>;
#define MSL_EMU_UNARY(name, expr)                      \
  template <typename T>                                \
  inline T name(T x_in) {                              \
    math_t<T> x = static_cast<math_t<T>>(x_in);        \
    return static_cast<T>(expr);                       \
  }
MSL_EMU_UNARY(exp, std::exp(x))
MSL_EMU_UNARY(exp2, std::exp2(x))
MSL_EMU_UNARY(log, std::log(x))
MSL_EMU_UNARY(log2, std::log2(x))
MSL_EMU_UNARY(sqrt, std::sqrt(x))
MSL_EMU_UNARY(rsqrt, 1 / std::sqrt(x))
MSL_EMU_UNARY(abs, std::abs(x))
MSL_EMU_UNARY(fabs, std::abs(x))
MSL_EMU_UNARY(tanh, std::tanh(x))
MSL_EMU_UNARY(log1p, std::log1p(x))
MSL_EMU_UNARY(floor, std::floor(x))
MSL_EMU_UNARY(ceil, std::ceil(x))
#undef MSL_EMU_UNARY
template <typename T>
inline T max(T a, T b) { return a > b ? a : b; }
template <typename T>
inline T min(T a, T b) { return a < b ? a : b; }
template <typename T>
inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }
template <typename T>
inline T fma(T a, T b, T c) { return a * b + c; }
template <typename T>
inline T pow(T a, T b) { return static_cast<T>(std::pow(math_t<T>(a), math_t<T>(b))); }
template <typename T>
inline T select(T a, T b, bool c) { return c ? b : a; }

namespace fast {
using metal::exp;
using metal::exp2;
using metal::log;
using metal::log2;
using metal::sqrt;
using metal::rsqrt;
using metal::tanh;
using metal::pow;
using metal::max;
using metal::min;
}  // namespace fast
namespace precise {
using namespace fast;
}  // namespace precise

// ---- simdgroup collectives over the 32 lanes
template <typename T, typename Op>
inline T simd_reduce(T value, Op op) {
  msl_emu::Exchange<T> ex(value);
  bool first = true;
  T acc{};
  for (unsigned i = 0; i < msl_emu::kSimdWidth; ++i) {
    if (!ex.live(i)) continue;
    T v = ex.lane_value(i);
    acc = first ? v : static_cast<T>(op(acc, v));
    first = false;
  }
  return acc;
}
template <typename T>
inline T simd_sum(T v) { return simd_reduce(v, [](T a, T b) { return a + b; }); }
template <typename T>
inline T simd_product(T v) { return simd_reduce(v, [](T a, T b) { return a * b; }); }
template <typename T>
inline T simd_max(T v) { return simd_reduce(v, [](T a, T b) { return a > b ? a : b; }); }
template <typename T>
inline T simd_min(T v) { return simd_reduce(v, [](T a, T b) { return a < b ? a : b; }); }
inline bool simd_all(bool v) { return simd_reduce(v, [](bool a, bool b) { return a && b; }); }
inline bool simd_any(bool v) { return simd_reduce(v, [](bool a, bool b) { return a || b; }); }

template <typename T>
inline T simd_prefix_sum(T value, bool inclusive) {
  msl_emu::Exchange<T> ex(value);
  unsigned lane = msl_emu::runtime().current->info.thread_index_in_simdgroup;
  T acc = T(0);
  for (unsigned i = 0; i < lane + (inclusive ? 1u : 0u); ++i)
    if (ex.live(i)) acc = acc + ex.lane_value(i);
  return acc;
}
template <typename T>
inline T simd_prefix_inclusive_sum(T v) { return simd_prefix_sum(v, true); }
template <typename T>
inline T simd_prefix_exclusive_sum(T v) { return simd_prefix_sum(v, false); }

// Reads lane `source(my_lane)`; an out-of-range source keeps the caller's value
// (the Metal rule for shuffle up/down), an absent lane reads poison.
template <typename T, typename Source>
inline T simd_permute(T value, Source source, bool keep_out_of_range) {
  msl_emu::Exchange<T> ex(value);
  int lane = int(msl_emu::runtime().current->info.thread_index_in_simdgroup);
  int from = source(lane);
  if (from < 0 || from >= msl_emu::kSimdWidth) {
    if (keep_out_of_range) return value;
    from &= msl_emu::kSimdWidth - 1;
  }
  return ex.lane_value(unsigned(from));
}
template <typename T>
inline T simd_shuffle(T v, ushort lane) { return simd_permute(v, [&](int) { return int(lane); }, false); }
template <typename T>
inline T simd_broadcast(T v, ushort lane) { return simd_shuffle(v, lane); }
template <typename T>
inline T simd_shuffle_down(T v, ushort delta) { return simd_permute(v, [&](int l) { return l + int(delta); }, true); }
template <typename T>
inline T simd_shuffle_up(T v, ushort delta) { return simd_permute(v, [&](int l) { return l - int(delta); }, true); }
template <typename T>
inline T simd_shuffle_xor(T v, ushort mask) { return simd_permute(v, [&](int l) { return l ^ int(mask); }, false); }
template <typename T>
inline T simd_broadcast_first(T v) {
  msl_emu::Exchange<T> ex(v);
  for (unsigned i = 0; i < msl_emu::kSimdWidth; ++i)
    if (ex.live(i)) return ex.lane_value(i);
  return v;
}
inline bool simd_is_first() {
  return simd_broadcast_first(msl_emu::runtime().current->info.thread_index_in_simdgroup) ==
         msl_emu::runtime().current->info.thread_index_in_simdgroup;
}

// ---- simdgroup matrices: every lane keeps the whole 8x8 tile. The collective
// ops synchronise the simdgroup like the hardware's, so lanes cannot drift.
template <typename T, int Rows, int Cols>
struct simdgroup_matrix {
  T data[Rows][Cols];
  simdgroup_matrix() = default;
  explicit simdgroup_matrix(T fill) {
    for (int r = 0; r < Rows; ++r)
      for (int c = 0; c < Cols; ++c) data[r][c] = fill;
  }
};
using simdgroup_float8x8 = simdgroup_matrix<float, 8, 8>;
using simdgroup_half8x8 = simdgroup_matrix<half, 8, 8>;
using simdgroup_bfloat8x8 = simdgroup_matrix<bfloat, 8, 8>;

template <typename T, int R, int C>
inline simdgroup_matrix<T, R, C> make_filled_simdgroup_matrix(T fill) {
  return simdgroup_matrix<T, R, C>(fill);
}
template <typename T, typename P, int R, int C>
inline void simdgroup_load(simdgroup_matrix<T, R, C>& m, const P* src, ulong elements_per_row = C,
                           ulong2 origin = ulong2(0ul, 0ul), bool transpose = false) {
  simdgroup_barrier(mem_flags::mem_none);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      ulong row = origin.y + (transpose ? c : r), col = origin.x + (transpose ? r : c);
      m.data[r][c] = static_cast<T>(src[row * elements_per_row + col]);
    }
}
template <typename T, typename P, int R, int C>
inline void simdgroup_store(const simdgroup_matrix<T, R, C>& m, P* dst, ulong elements_per_row = C,
                            ulong2 origin = ulong2(0ul, 0ul), bool transpose = false) {
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < C; ++c) {
      ulong row = origin.y + (transpose ? c : r), col = origin.x + (transpose ? r : c);
      dst[row * elements_per_row + col] = static_cast<P>(m.data[r][c]);
    }
  simdgroup_barrier(mem_flags::mem_none);
}
template <typename T, int M, int N, int K>
inline void simdgroup_multiply_accumulate(simdgroup_matrix<T, M, N>& d, const simdgroup_matrix<T, M, K>& a,
                                          const simdgroup_matrix<T, K, N>& b,
                                          const simdgroup_matrix<T, M, N>& c) {
  simdgroup_matrix<T, M, N> out;
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      T acc = c.data[i][j];
      for (int k = 0; k < K; ++k) acc += a.data[i][k] * b.data[k][j];
      out.data[i][j] = acc;
    }
  d = out;
}
template <typename T, int M, int N, int K>
inline void simdgroup_multiply(simdgroup_matrix<T, M, N>& d, const simdgroup_matrix<T, M, K>& a,
                               const simdgroup_matrix<T, K, N>& b) {
  simdgroup_multiply_accumulate(d, a, b, simdgroup_matrix<T, M, N>(T(0)));
}

}  // namespace metal

using namespace metal;

// ---------------------------------------------------------------- address spaces
// Defined last so that the standard headers above are not affected. `constant`
// becomes `volatile` so that the C++ compiler rejects what Metal rejects: a
// constant-space pointer (MLX binds inputs under 8 elements there) converted to a
// device-space one.
#define device
#define constant volatile
#define thread
#define threadgroup static
