#include "plugin_common.h"

#include <atomic>
#include <cstring>

using namespace nvinfer1;

namespace tokenskip {
namespace plugin {

namespace {
std::atomic<ILoggerFinder*> gFinder{nullptr};
std::atomic<bool> gAliasedIo{false};
std::atomic<int64_t> gAliasesGranted{0};

void logAt(ILogger::Severity sev, std::string const& msg) noexcept {
    ILoggerFinder* finder = gFinder.load();
    ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger) logger->log(sev, ("[tokenskip] " + msg).c_str());
}
} // namespace

void setLoggerFinder(ILoggerFinder* finder) noexcept { gFinder.store(finder); }
void logError(std::string const& msg) noexcept { logAt(ILogger::Severity::kERROR, msg); }
void logWarning(std::string const& msg) noexcept { logAt(ILogger::Severity::kWARNING, msg); }
void logInfo(std::string const& msg) noexcept { logAt(ILogger::Severity::kINFO, msg); }

void setAliasedIo(bool on) noexcept { gAliasedIo.store(on); }
bool aliasedIo() noexcept { return gAliasedIo.load(); }
void countAliasGranted() noexcept { gAliasesGranted.fetch_add(1); }
int64_t aliasesGranted() noexcept { return gAliasesGranted.load(); }

bool readIntField(PluginFieldCollection const* fc, char const* plugin, char const* name, int64_t& value) noexcept {
    for (int32_t i = 0; fc != nullptr && i < fc->nbFields; ++i) {
        PluginField const& f = fc->fields[i];
        if (f.name == nullptr || std::strcmp(f.name, name) != 0) continue;
        if (f.data == nullptr || f.length < 1) break;
        switch (f.type) {
        case PluginFieldType::kINT64: value = *static_cast<int64_t const*>(f.data); return true;
        case PluginFieldType::kINT32: value = *static_cast<int32_t const*>(f.data); return true;
        case PluginFieldType::kINT16: value = *static_cast<int16_t const*>(f.data); return true;
        case PluginFieldType::kINT8: value = *static_cast<int8_t const*>(f.data); return true;
        default: break;
        }
        logError(std::string(plugin) + ": attribute " + name + " must be an integer");
        return false;
    }
    logError(std::string(plugin) + ": required attribute " + name + " is missing");
    return false;
}

bool toElemKind(DataType t, ElemKind& out) noexcept {
    switch (t) {
    case DataType::kFLOAT: out = ElemKind::kF32; return true;
    case DataType::kHALF: out = ElemKind::kF16; return true;
    case DataType::kBF16: out = ElemKind::kBF16; return true;
    default: return false;
    }
}

bool toIndexKind(DataType t, IndexKind& out) noexcept {
    switch (t) {
    case DataType::kINT32: out = IndexKind::kI32; return true;
    case DataType::kINT64: out = IndexKind::kI64; return true;
    default: return false;
    }
}

bool isHiddenType(DataType t) noexcept {
    ElemKind e;
    return toElemKind(t, e);
}

} // namespace plugin
} // namespace tokenskip
