// The run-time choice between the 256-bit and the AVX-512 matmul variants (avx512.h).
#include "avx512.h"

#include <atomic>
#include <cstdlib>
#include <cstring>

namespace slmkit {

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}

namespace {
std::atomic<bool>& setting() {
  static std::atomic<bool> enabled{[] {
    const char* env = std::getenv("SLMKIT_AVX512");
    return cpu_has_avx512() && !(env != nullptr && std::strcmp(env, "0") == 0);
  }()};
  return enabled;
}
}  // namespace

bool use_avx512() { return setting().load(std::memory_order_relaxed); }

bool set_avx512(bool enabled) { return setting().exchange(enabled && cpu_has_avx512()); }

}  // namespace slmkit
