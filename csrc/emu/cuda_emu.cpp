// The CUDA-semantics emulator's runtime: launches, block barriers, warp collectives and shared
// memory. See cuda_emu.h for the model.
//
// A launch hands its blocks to a few host threads (workers). A worker runs a block as one fiber
// per CUDA thread: a scheduler loop resumes each runnable fiber in thread order, and a fiber runs
// until it returns or waits at __syncthreads or a warp collective. A collective executes when
// the last lane of its mask arrives (that lane computes every lane's result and marks them
// runnable); a barrier opens when the last live thread arrives. So the lanes of a warp advance in
// lock step from collective to collective, as on the GPU, and no OS-level synchronisation is
// needed inside a block (a switch costs about a microsecond, not a futex round trip).
//
// Sanitizers: the fiber switches are announced to AddressSanitizer (stack bounds) and to
// ThreadSanitizer (one TSan fiber per CUDA thread, switched without implicit synchronisation).
// TSan is then told of exactly the synchronisation the GPU provides: a release by every thread
// arriving at a barrier or collective, an acquire by every thread leaving it. The runtime's own
// bookkeeping is hidden from TSan (it is single-threaded per block by construction).
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>
#include <vector>

#if defined(__SANITIZE_THREAD__)
#define NPID_EMU_TSAN 1
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#endif
#if defined(__SANITIZE_ADDRESS__)
#define NPID_EMU_ASAN 1
#include <sanitizer/common_interface_defs.h>
#endif

thread_local uint3 threadIdx{0, 0, 0};
thread_local uint3 blockIdx{0, 0, 0};
thread_local dim3 blockDim{1, 1, 1};
thread_local dim3 gridDim{1, 1, 1};

namespace npid_emu {
namespace {

// Kernel frames are small (a few KiB even instrumented); a guard page below each stack turns an
// overflow into a fault. ASan's swapcontext interceptor clears the shadow of the whole target
// stack at every switch, so its stacks are kept small: that clearing is most of an ASan run.
#if defined(NPID_EMU_ASAN)
constexpr size_t kStackBytes = 64 * 1024;
#elif defined(NPID_EMU_TSAN)
constexpr size_t kStackBytes = 256 * 1024;
#else
constexpr size_t kStackBytes = 128 * 1024;
#endif

enum class State { kRunning, kBarrier, kCollective, kExited };

struct Lane {
  State state = State::kRunning;
  Site site{"", 0};
  Collective kind = Collective::kShfl;
  unsigned mask = 0;
  uint64_t value = 0;
  int arg = 0, width = 32;
  uint64_t result = 0;
};

// Thrown in a fiber after an error was recorded, to unwind its kernel body.
struct Abort {};

// Runtime bookkeeping is invisible to TSan (see the file comment).
struct TsanIgnore {
#ifdef NPID_EMU_TSAN
  TsanIgnore() { __tsan_ignore_thread_begin(); }
  ~TsanIgnore() { __tsan_ignore_thread_end(); }
#endif
};

const char* collective_name(Collective k) {
  switch (k) {
    case Collective::kShfl: return "__shfl_sync";
    case Collective::kShflXor: return "__shfl_xor_sync";
    case Collective::kAny: return "__any_sync";
    case Collective::kAll: return "__all_sync";
  }
  return "?";
}

std::string where(const Site& s) {
  const char* slash = std::strrchr(s.file, '/');
  return std::string(slash ? slash + 1 : s.file) + ":" + std::to_string(s.line);
}

bool same_site(const Site& a, const Site& b) {
  return a.line == b.line && std::strcmp(a.file, b.file) == 0;
}

std::string hex(unsigned v) {
  char buf[16];
  std::snprintf(buf, sizeof(buf), "0x%08x", v);
  return buf;
}

// One fiber stack: mmap'd, with an inaccessible guard page below it (an overflow faults).
struct Stack {
  char* base = nullptr;
  size_t bytes = 0;
  Stack() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    bytes = kStackBytes + page;
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) throw std::bad_alloc();
    base = static_cast<char*>(p);
    mprotect(base, page, PROT_NONE);
  }
  ~Stack() { munmap(base, bytes); }
  Stack(const Stack&) = delete;
  Stack& operator=(const Stack&) = delete;
  char* bottom() const { return base + (bytes - kStackBytes); }
};

struct Block;
thread_local Block* tl_block = nullptr;

// One worker's running block: its fibers, lanes, barrier and shared memory.
struct Block {
  const Launch& launch;
  const std::function<void()>& body;
  const int nthreads;
  std::vector<Lane> lanes;
  std::vector<std::unique_ptr<Stack>> stacks;
  std::vector<ucontext_t> contexts;
  std::vector<char> started;
  ucontext_t scheduler{};
  int current = -1;  // the running fiber, -1: the scheduler
  int live = 0, arrived = 0;
  Site barrier_site{"", 0};
  uint3 index{0, 0, 0};
  bool failed = false;
  std::string error;
  std::vector<std::pair<const void*, void*>> statics;
  size_t static_bytes = 0;
  void* dynamic = nullptr;
  // TSan synchronisation objects: their addresses are what release / acquire name.
  char barrier_token = 0;
  char warp_tokens[32] = {};
  char exit_token = 0;
#ifdef NPID_EMU_TSAN
  void* scheduler_fiber = nullptr;
  std::vector<void*> tsan_fibers;
#endif
#ifdef NPID_EMU_ASAN
  const void* scheduler_stack_bottom = nullptr;
  size_t scheduler_stack_size = 0;
#endif

  Block(const Launch& l, const std::function<void()>& b, int n)
      : launch(l), body(b), nthreads(n), lanes(static_cast<size_t>(n)), contexts(static_cast<size_t>(n)) {
    for (int t = 0; t < n; ++t) stacks.emplace_back(new Stack());
  }

  std::string who(int tid) const {
    std::ostringstream o;
    o << "emulated CUDA: kernel " << launch.kernel << ", block (" << index.x << "," << index.y
      << "," << index.z << "), thread " << tid << " (warp " << tid / 32 << ", lane " << tid % 32
      << "): ";
    return o.str();
  }

  void record(int tid, const std::string& what) {
    if (!failed) {
      failed = true;
      error = who(tid) + what;
    }
  }
  [[noreturn]] void fail(int tid, const std::string& what) {
    record(tid, what);
    throw Abort{};
  }

  std::string describe_waits() const {
    std::ostringstream o;
    int shown = 0;
    for (int t = 0; t < nthreads && shown < 4; ++t) {
      const Lane& l = lanes[t];
      if (l.state == State::kBarrier || l.state == State::kCollective) {
        o << (shown ? "; " : "") << "thread " << t << " at "
          << (l.state == State::kBarrier ? "__syncthreads" : collective_name(l.kind)) << " ("
          << where(l.site) << ")";
        ++shown;
      }
    }
    return o.str();
  }

  // ---- fiber switching, announced to the sanitizers
  void switch_to_fiber(int tid) {
    current = tid;
    threadIdx = uint3{tid % launch.block.x, (tid / launch.block.x) % launch.block.y,
                      tid / (launch.block.x * launch.block.y)};
#ifdef NPID_EMU_TSAN
    // The first switch into a fiber synchronises (what the block saw at launch happens before
    // the thread starts); later switches do not.
    __tsan_switch_to_fiber(tsan_fibers[tid], started[tid] ? __tsan_switch_to_fiber_no_sync : 0);
#endif
    started[tid] = true;
#ifdef NPID_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, stacks[tid]->bottom(), kStackBytes);
#endif
    swapcontext(&scheduler, &contexts[tid]);
#ifdef NPID_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
    current = -1;
  }

  // From a waiting fiber: back to the scheduler (it resumes this fiber once it can proceed).
  void switch_to_scheduler() {
    const int tid = current;
#ifdef NPID_EMU_TSAN
    __tsan_switch_to_fiber(scheduler_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef NPID_EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, scheduler_stack_bottom, scheduler_stack_size);
#endif
    swapcontext(&contexts[tid], &scheduler);
#ifdef NPID_EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, &scheduler_stack_bottom, &scheduler_stack_size);
#endif
  }

  static void fiber_main() {
    Block& b = *tl_block;
    const int tid = b.current;
#ifdef NPID_EMU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &b.scheduler_stack_bottom, &b.scheduler_stack_size);
#endif
    try {
      b.body();
    } catch (const Abort&) {
    } catch (const std::exception& e) {
      TsanIgnore ignore;
      b.record(tid, e.what());
    }
#ifdef NPID_EMU_TSAN
    void* scheduler_fiber = nullptr;
#endif
    {
      TsanIgnore ignore;
      b.exit_thread(tid);
#ifdef NPID_EMU_TSAN
      scheduler_fiber = b.scheduler_fiber;  // read before the release: the Block may be reused
#endif
    }
#ifdef NPID_EMU_TSAN
    __tsan_release(&b.exit_token);  // nothing of the block is read below this line
    __tsan_switch_to_fiber(scheduler_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#ifdef NPID_EMU_ASAN
    __sanitizer_start_switch_fiber(nullptr, b.scheduler_stack_bottom, b.scheduler_stack_size);
#endif
    setcontext(&b.scheduler);
  }

  void exit_thread(int tid) {
    lanes[tid].state = State::kExited;
    --live;
    if (failed) return;
    const int base = tid & ~31;
    for (int t = base; t < std::min(base + 32, nthreads); ++t) {
      const Lane& o = lanes[t];
      if (o.state == State::kCollective && ((o.mask >> (tid & 31)) & 1u)) {
        record(t, std::string(collective_name(o.kind)) + " at " + where(o.site) +
                      " names lane " + std::to_string(tid & 31) +
                      " in its mask, but that lane has returned from the kernel");
        return;
      }
    }
    if (arrived > 0 && arrived == live) release_barrier();
  }

  void release_barrier() {
    for (Lane& l : lanes)
      if (l.state == State::kBarrier) l.state = State::kRunning;
    arrived = 0;
  }

  // ---- one block, start to end (on the worker's own stack)
  void run_block(uint3 idx) {
    TsanIgnore ignore;  // the scheduler's bookkeeping (the fibers have their own TSan state)
    index = idx;
    blockIdx = idx;
    for (Lane& l : lanes) l = Lane{};
    started.assign(static_cast<size_t>(nthreads), 0);
    live = nthreads;
    arrived = 0;
    failed = false;
    error.clear();
    if (launch.dynamic_smem > 0) {
      dynamic = std::malloc(launch.dynamic_smem);
      if (dynamic == nullptr) throw std::bad_alloc();
      std::memset(dynamic, 0xFF, launch.dynamic_smem);
    }
#ifdef NPID_EMU_TSAN
    scheduler_fiber = __tsan_get_current_fiber();
    tsan_fibers.assign(static_cast<size_t>(nthreads), nullptr);
    for (int t = 0; t < nthreads; ++t) tsan_fibers[t] = __tsan_create_fiber(0);
#endif
    for (int t = 0; t < nthreads; ++t) {
      getcontext(&contexts[t]);
      contexts[t].uc_stack.ss_sp = stacks[t]->bottom();
      contexts[t].uc_stack.ss_size = kStackBytes;
      contexts[t].uc_link = nullptr;
      makecontext(&contexts[t], &Block::fiber_main, 0);
    }
    bool deadlock_reported = false;
    for (;;) {
      bool progressed = false;
      for (int t = 0; t < nthreads; ++t) {
        const State s = lanes[t].state;
        if (s == State::kExited) continue;
        if (s != State::kRunning && !failed) continue;
        switch_to_fiber(t);
        progressed = true;
      }
      if (live == 0) break;
      if (!progressed && !failed && !deadlock_reported) {
        deadlock_reported = true;
        record(0, "every live thread of the block waits and none can proceed (deadlock): " +
                      describe_waits());
      }
    }
#ifdef NPID_EMU_TSAN
    __tsan_acquire(&exit_token);
    for (void* f : tsan_fibers) __tsan_destroy_fiber(f);
    tsan_fibers.clear();
#endif
    for (auto& s : statics) std::free(s.second);
    statics.clear();
    static_bytes = 0;
    std::free(dynamic);
    dynamic = nullptr;
  }
};

Block& current(const char* what) {
  if (tl_block == nullptr || tl_block->current < 0)
    throw std::logic_error(std::string(what) + " called outside an emulated kernel launch");
  return *tl_block;
}

}  // namespace

uint64_t collective(Site site, Collective kind, unsigned mask, uint64_t value, int arg, int width) {
  TsanIgnore ignore;  // the runtime's state; the kernel's memory is ordered by the tokens below
  Block& b = current(collective_name(kind));
  const int tid = b.current, lane = tid & 31, warp = tid >> 5, base = warp * 32;
#ifdef NPID_EMU_TSAN
  __tsan_release(&b.warp_tokens[warp]);
#endif
  {
    if (b.failed) throw Abort{};
    if (width < 1 || width > 32 || (width & (width - 1)) != 0)
      b.fail(tid, std::string(collective_name(kind)) + " at " + where(site) + ": width " +
                      std::to_string(width) + " is not a power of two in [1, 32]");
    if (((mask >> lane) & 1u) == 0)
      b.fail(tid, std::string(collective_name(kind)) + " at " + where(site) + " with mask " +
                      hex(mask) + ", which does not name the calling lane");
    Lane& me = b.lanes[tid];
    me.state = State::kCollective;
    me.site = site;
    me.kind = kind;
    me.mask = mask;
    me.value = value;
    me.arg = arg;
    me.width = width;

    bool ready = true;
    for (int l = 0; l < 32; ++l) {
      if (((mask >> l) & 1u) == 0) continue;
      const int t = base + l;
      auto head = [&] {
        return std::string(collective_name(kind)) + " at " + where(site) + " (mask " + hex(mask) +
               ") needs lane " + std::to_string(l);
      };
      if (t >= b.nthreads) b.fail(tid, head() + ", which this block does not have");
      const Lane& o = b.lanes[t];
      if (o.state == State::kExited) b.fail(tid, head() + ", which has returned from the kernel");
      if (o.state == State::kBarrier)
        b.fail(tid, head() + ", which waits at __syncthreads (" + where(o.site) +
                        "): divergent collective");
      if (o.state == State::kRunning) {
        ready = false;
      } else if (o.kind != kind || o.mask != mask || !same_site(o.site, site)) {
        b.fail(tid, head() + ", which is at " + collective_name(o.kind) + " (" + where(o.site) +
                        ", mask " + hex(o.mask) + "): divergent collective");
      }
    }

    if (ready) {
      uint64_t any = 0, all = 1;
      for (int l = 0; l < 32; ++l) {
        if (((mask >> l) & 1u) == 0) continue;
        any |= b.lanes[base + l].value;
        all &= b.lanes[base + l].value;
      }
      uint64_t results[32] = {};
      for (int l = 0; l < 32; ++l) {
        if (((mask >> l) & 1u) == 0) continue;
        const Lane& o = b.lanes[base + l];
        int src = l;
        if (kind == Collective::kShfl) {
          src = (l & ~(o.width - 1)) + (o.arg & (o.width - 1));
        } else if (kind == Collective::kShflXor) {
          src = l ^ o.arg;
          if (src < 0 || src > 31 || src / o.width > l / o.width) src = l;  // later group: own value
        }
        if ((kind == Collective::kShfl || kind == Collective::kShflXor) && ((mask >> src) & 1u) == 0)
          b.fail(base + l, std::string(collective_name(kind)) + " at " + where(site) +
                               " reads lane " + std::to_string(src) + ", which is not in the mask " +
                               hex(mask));
        results[l] = kind == Collective::kAny ? any
                     : kind == Collective::kAll ? all
                                                : b.lanes[base + src].value;
      }
      for (int l = 0; l < 32; ++l) {
        if (((mask >> l) & 1u) == 0) continue;
        b.lanes[base + l].result = results[l];
        b.lanes[base + l].state = State::kRunning;
      }
    } else {
      b.switch_to_scheduler();  // resumed once the collective executed (or the launch failed)
      if (me.state == State::kCollective) throw Abort{};
    }
  }
#ifdef NPID_EMU_TSAN
  __tsan_acquire(&b.warp_tokens[warp]);
#endif
  return b.lanes[tid].result;
}

void syncthreads(Site site) {
  TsanIgnore ignore;  // the runtime's state; the kernel's memory is ordered by the token below
  Block& b = current("__syncthreads");
  const int tid = b.current;
#ifdef NPID_EMU_TSAN
  __tsan_release(&b.barrier_token);
#endif
  {
    if (b.failed) throw Abort{};
    const int base = tid & ~31;
    for (int t = base; t < std::min(base + 32, b.nthreads); ++t) {
      const Lane& o = b.lanes[t];
      if (o.state == State::kCollective && ((o.mask >> (tid & 31)) & 1u))
        b.fail(t, std::string(collective_name(o.kind)) + " at " + where(o.site) + " needs lane " +
                      std::to_string(tid & 31) + ", which reached __syncthreads (" + where(site) +
                      "): divergent collective");
    }
    if (b.arrived == 0) {
      b.barrier_site = site;
    } else if (!same_site(b.barrier_site, site)) {
      b.fail(tid, "__syncthreads at " + where(site) + " while other threads wait at __syncthreads (" +
                      where(b.barrier_site) + "): a barrier in divergent code");
    }
    Lane& me = b.lanes[tid];
    me.state = State::kBarrier;
    me.site = site;
    if (++b.arrived == b.live) {
      b.release_barrier();
    } else {
      b.switch_to_scheduler();
      if (me.state == State::kBarrier) throw Abort{};
    }
  }
#ifdef NPID_EMU_TSAN
  __tsan_acquire(&b.barrier_token);
#endif
}

void* static_shared(const void* key, size_t bytes, size_t align, const char* name) {
  TsanIgnore ignore;
  Block& b = current("__shared__ declaration");
  if (b.failed) throw Abort{};
  for (const auto& s : b.statics)
    if (s.first == key) return s.second;
  const size_t padded = (bytes + align - 1) / align * align;
  if (b.static_bytes + padded + b.launch.dynamic_smem > kMaxSharedBytes)
    b.fail(b.current, std::string("__shared__ ") + name + " (" + std::to_string(bytes) +
                          " bytes) takes the block's shared memory past 48 KiB (dynamic: " +
                          std::to_string(b.launch.dynamic_smem) + " bytes)");
  void* p = std::aligned_alloc(align < 16 ? 16 : align, (bytes + 15) / 16 * 16);
  if (p == nullptr) throw std::bad_alloc();
  std::memset(p, 0xFF, bytes);
  b.statics.emplace_back(key, p);
  b.static_bytes += padded;
  return p;
}

void* dynamic_shared() {
  TsanIgnore ignore;
  return current("extern __shared__ declaration").dynamic;
}

void run(const Launch& launch, const std::function<void()>& body) {
  const uint64_t nthreads = uint64_t(launch.block.x) * launch.block.y * launch.block.z;
  const uint64_t nblocks = uint64_t(launch.grid.x) * launch.grid.y * launch.grid.z;
  auto bad = [&](const std::string& what) {
    throw std::runtime_error(std::string("emulated CUDA: launch of ") + launch.kernel +
                                ": invalid configuration: " + what);
  };
  if (nthreads == 0 || nblocks == 0)
    bad("empty grid or block (grid " + std::to_string(nblocks) + " blocks, block " +
        std::to_string(nthreads) + " threads)");
  if (nthreads > 1024 || launch.block.x > 1024 || launch.block.y > 1024 || launch.block.z > 64)
    bad("block of " + std::to_string(nthreads) + " threads exceeds the device's 1024 limit");
  if (launch.max_threads > 0 && nthreads > static_cast<uint64_t>(launch.max_threads))
    bad("block of " + std::to_string(nthreads) + " threads exceeds the kernel's __launch_bounds__ " +
        std::to_string(launch.max_threads));
  if (launch.grid.x > 0x7fffffffu || launch.grid.y > 65535 || launch.grid.z > 65535)
    bad("grid (" + std::to_string(launch.grid.x) + "," + std::to_string(launch.grid.y) + "," +
        std::to_string(launch.grid.z) + ") exceeds the device's limits");
  if (launch.dynamic_smem > kMaxSharedBytes)
    bad(std::to_string(launch.dynamic_smem) +
        " bytes of dynamic shared memory exceed the 48 KiB a kernel gets without opting in");

  // Blocks go to the workers in order; the first failing block (lowest index) is reported.
  std::atomic<uint64_t> next{0};
  std::atomic<bool> stop{false};
  std::mutex error_mu;
  uint64_t error_block = UINT64_MAX;
  std::string error;
  auto worker = [&] {
    try {
      Block block(launch, body, static_cast<int>(nthreads));
      tl_block = &block;
      blockDim = launch.block;
      gridDim = launch.grid;
      for (uint64_t i = next++; i < nblocks && !stop.load(); i = next++) {
        const uint3 idx{static_cast<unsigned>(i % launch.grid.x),
                        static_cast<unsigned>((i / launch.grid.x) % launch.grid.y),
                        static_cast<unsigned>(i / (uint64_t(launch.grid.x) * launch.grid.y))};
        block.run_block(idx);
        if (block.failed) {
          std::lock_guard<std::mutex> lk(error_mu);
          if (i < error_block) {
            error_block = i;
            error = block.error;
          }
          stop = true;
        }
      }
    } catch (const std::exception& e) {
      std::lock_guard<std::mutex> lk(error_mu);
      error_block = 0;
      error = std::string("emulated CUDA: ") + launch.kernel + ": " + e.what();
      stop = true;
    }
    tl_block = nullptr;
  };
  const unsigned hw = std::max(1u, std::thread::hardware_concurrency());
  const uint64_t nworkers = std::min<uint64_t>({nblocks, hw, 8});
  if (nworkers <= 1) {
    worker();
  } else {
    std::vector<std::thread> team;
    for (uint64_t w = 0; w < nworkers; ++w) team.emplace_back(worker);
    for (auto& t : team) t.join();
  }
  if (error_block != UINT64_MAX) throw std::runtime_error(error);
}

}  // namespace npid_emu
