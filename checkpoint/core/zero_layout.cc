#include "checkpoint/core/zero_layout.h"

#include <algorithm>

namespace ckptkv::checkpoint {

FlatLayout Zero12Layout(const std::vector<int64_t>& numels, int dp) {
  FlatLayout l;
  l.dp = dp;
  for (int64_t n : numels) l.total += n;
  const int64_t align = kNcclStartAlignmentFactor * dp;
  const int64_t aligned = (l.total + align - 1) / align * align;
  l.partition_size = aligned / dp;
  const int64_t P = l.partition_size;
  l.paddings.assign(dp, 0);
  l.pieces.assign(dp, {});
  for (int r = 0; r < dp; ++r) {
    const int64_t lo = r * P;
    const int64_t hi = lo + P;
    if (l.total <= lo) {
      l.paddings[r] = P;
    } else if (l.total < hi) {
      l.paddings[r] = hi - l.total;
    }
  }
  int64_t off = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    const int64_t n = numels[i];
    int64_t pos = off;
    while (pos < off + n) {
      const int r = static_cast<int>(pos / P);
      const int64_t end = std::min(off + n, (r + 1) * P);
      l.pieces[r].push_back(FlatPiece{static_cast<int>(i), pos - r * P, end - pos, pos - off});
      pos = end;
    }
    off += n;
  }
  return l;
}

FlatLayout Zero3Layout(const std::vector<int64_t>& numels, int dp) {
  FlatLayout l;
  l.dp = dp;
  l.paddings.assign(dp, 0);
  l.pieces.assign(dp, {});
  for (int64_t n : numels) {
    l.total += n;
    l.partition_size += (n + dp - 1) / dp;
  }
  for (int r = 0; r < dp; ++r) {
    int64_t offset = 0;
    for (size_t i = 0; i < numels.size(); ++i) {
      const int64_t n = numels[i];
      const int64_t pn = (n + dp - 1) / dp;
      const int64_t len = std::max<int64_t>(0, std::min(pn, n - r * pn));
      if (len > 0) l.pieces[r].push_back(FlatPiece{static_cast<int>(i), offset, len, r * pn});
      l.paddings[r] += pn - len;
      offset += pn;
    }
  }
  return l;
}

}  // namespace ckptkv::checkpoint
