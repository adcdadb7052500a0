using System;
using System.Collections.Generic;
using System.IO;

namespace Zyke
{
    /// <summary>Finds the local daemon like the Python SDK: environment first, then the daemon's
    /// token file and runtime file in the per-user config/data dirs (platformdirs layout).</summary>
    public static class ZykeLocator
    {
        public const int DefaultPort = 7341;
        const string App = "zyke";

        /// <summary>ZYKE_TOKEN, else the token file; null when neither exists.</summary>
        public static string ReadToken()
        {
            string env = Environment.GetEnvironmentVariable("ZYKE_TOKEN");
            if (!string.IsNullOrEmpty(env)) return env;
            string path = Path.Combine(ConfigDir(), "token");
            try
            {
                string token = File.ReadAllText(path).Trim();
                return token.Length > 0 ? token : null;
            }
            catch (IOException) { return null; }
            catch (UnauthorizedAccessException) { return null; }
        }

        /// <summary>ZYKE_URL, else host/port from the daemon's runtime file, else the default port.</summary>
        public static string DefaultUrl()
        {
            string env = Environment.GetEnvironmentVariable("ZYKE_URL");
            if (!string.IsNullOrEmpty(env)) return env;
            try
            {
                var info = Json.ParseObject(File.ReadAllText(Path.Combine(DataDir(), "daemon.json")));
                string host = JsonRead.Str(info, "host");
                long port = JsonRead.Long(info, "port");
                if (host != null && port > 0) return "ws://" + host + ":" + port;
            }
            catch (IOException) { }
            catch (UnauthorizedAccessException) { }
            catch (FormatException) { }
            return "ws://127.0.0.1:" + DefaultPort;
        }

        public static string ConfigDir()
        {
            string env = Environment.GetEnvironmentVariable("ZYKE_CONFIG_DIR");
            return !string.IsNullOrEmpty(env) ? env : UserDir("XDG_CONFIG_HOME", ".config");
        }

        public static string DataDir()
        {
            string env = Environment.GetEnvironmentVariable("ZYKE_DATA_DIR");
            return !string.IsNullOrEmpty(env) ? env : UserDir("XDG_DATA_HOME", Path.Combine(".local", "share"));
        }

        static string UserDir(string xdgVar, string xdgDefault)
        {
            string home = Environment.GetEnvironmentVariable("HOME") ?? Environment.GetFolderPath(Environment.SpecialFolder.UserProfile);
            if (Path.DirectorySeparatorChar == '\\')
            {
                // platformdirs on Windows: %LOCALAPPDATA%\<appauthor>\<appname>, appauthor defaulting to appname.
                string local = Environment.GetEnvironmentVariable("LOCALAPPDATA")
                               ?? Environment.GetFolderPath(Environment.SpecialFolder.LocalApplicationData);
                return Path.Combine(Path.Combine(local, App), App);
            }
            if (Directory.Exists("/System/Library/CoreServices"))
                return Path.Combine(Path.Combine(home, "Library/Application Support"), App);
            string xdg = Environment.GetEnvironmentVariable(xdgVar);
            return Path.Combine(!string.IsNullOrEmpty(xdg) ? xdg : Path.Combine(home, xdgDefault), App);
        }
    }
}
