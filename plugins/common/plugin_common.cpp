#include "plugin_common.h"

#include <atomic>
#include <cstring>

using namespace nvinfer1;

namespace tokenskip {
namespace plugin {

namespace {
std::atomic<ILoggerFinder*> gFinder{nullptr};

void logAt(ILogger::Severity sev, std::string const& msg) noexcept {
    ILoggerFinder* finder = gFinder.load();
    ILogger* logger = finder ? finder->findLogger() : nullptr;
    if (logger) logger->log(sev, ("[tokenskip] " + msg).c_str());
}
} // namespace

void setLoggerFinder(ILoggerFinder* finder) noexcept { gFinder.store(finder); }
void logError(std::string const& msg) noexcept { logAt(ILogger::Severity::kERROR, msg); }
void logWarning(std::string const& msg) noexcept { logAt(ILogger::Severity::kWARNING, msg); }

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

IPluginCapability* PluginBase::getCapabilityInterface(PluginCapabilityType type) noexcept {
    switch (type) {
    case PluginCapabilityType::kCORE: return static_cast<IPluginV3OneCore*>(this);
    case PluginCapabilityType::kBUILD: return static_cast<IPluginV3OneBuild*>(this);
    case PluginCapabilityType::kRUNTIME: return static_cast<IPluginV3OneRuntime*>(this);
    }
    return nullptr;
}

} // namespace plugin
} // namespace tokenskip
