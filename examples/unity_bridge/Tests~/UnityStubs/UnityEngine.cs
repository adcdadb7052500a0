// Minimal stand-ins for the UnityEngine API that Runtime/Unity uses, so tests can type-check it
// with mcs where Unity is not installed. Not shipped; Unity provides the real assembly.
using System;

namespace UnityEngine
{
    public class Object { public string name = ""; }
    public class Component : Object { public T GetComponent<T>() { return default(T); } }
    public class Behaviour : Component { public bool enabled = true; }
    public class MonoBehaviour : Behaviour { }
    public static class Debug
    {
        public static void Log(object message) { Console.WriteLine(message); }
        public static void LogWarning(object message) { Console.WriteLine(message); }
        public static void LogError(object message) { Console.Error.WriteLine(message); }
        public static void LogError(object message, Object context) { Console.Error.WriteLine(message); }
        public static void LogWarning(object message, Object context) { Console.WriteLine(message); }
        public static void LogException(Exception exception, Object context) { Console.Error.WriteLine(exception); }
    }
    public class TextMesh : Component { public string text = ""; }
    public struct Rect { public Rect(float x, float y, float width, float height) { } }
    public static class GUI
    {
        public static string TextField(Rect position, string text) { return text; }
        public static bool Button(Rect position, string text) { return false; }
        public static void Label(Rect position, string text) { }
    }
    [AttributeUsage(AttributeTargets.Field)] public sealed class SerializeField : Attribute { }
    [AttributeUsage(AttributeTargets.Field)] public sealed class TooltipAttribute : Attribute { public TooltipAttribute(string t) { } }
    [AttributeUsage(AttributeTargets.Field)] public sealed class HeaderAttribute : Attribute { public HeaderAttribute(string h) { } }
    [AttributeUsage(AttributeTargets.Field)] public sealed class TextAreaAttribute : Attribute { public TextAreaAttribute(int a, int b) { } }
    [AttributeUsage(AttributeTargets.Field)] public sealed class RangeAttribute : Attribute
    {
        public RangeAttribute(float a, float b) { }
    }
    [AttributeUsage(AttributeTargets.Class)] public sealed class AddComponentMenu : Attribute { public AddComponentMenu(string m) { } }
}

namespace UnityEngine.Events
{
    public class UnityEvent<T0> { public void Invoke(T0 a) { } public void AddListener(Action<T0> f) { } }
    public class UnityEvent<T0, T1> { public void Invoke(T0 a, T1 b) { } public void AddListener(Action<T0, T1> f) { } }
    public class UnityEvent<T0, T1, T2> { public void Invoke(T0 a, T1 b, T2 c) { } public void AddListener(Action<T0, T1, T2> f) { } }
}

namespace UnityEngine.UI
{
    public class InputField : Component
    {
        public string text = "";
        public Events.UnityEvent<string> onEndEdit = new Events.UnityEvent<string>();
    }
}

namespace UnityEngine
{
    public static class PlayerPrefs
    {
        public static void SetString(string key, string value) { }
        public static string GetString(string key, string fallback) { return fallback; }
    }
}
